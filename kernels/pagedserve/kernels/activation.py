"""Activations (PyTorch path)."""

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate then up) -> silu(gate) * up, [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact (erf) or with the tanh approximation (`approximate="tanh"`)."""
    return F.gelu(x, approximate=approximate)
