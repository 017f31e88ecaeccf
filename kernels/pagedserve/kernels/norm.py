"""RMSNorm, the fused residual-add + RMSNorm, and LayerNorm (PyTorch path)."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the activation dtype, as the reference implementations do.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the next layer's input and residual."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, computed in float32 whatever the activation dtype."""
    out = F.layer_norm(x.float(), x.shape[-1:], weight.float(),
                       None if bias is None else bias.float(), eps)
    return out.to(x.dtype)
