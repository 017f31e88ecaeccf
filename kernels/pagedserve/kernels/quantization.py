"""Int8 weights (docs/quantization.md): quantizing a float weight per output channel, quantizing
activations per token, and the PyTorch matmuls on them, which every device can run.

A linear layer's weight W [N, K] becomes `Int8Weight`: int8 values q [N, K] and one float32
scale per output channel, s[n] = max_k |W[n, k]| / 127.5, with q = clamp(round(W / s), -128,
127): the symmetric int8 of compressed-tensors (and so of llm-compressor's checkpoints, which
load into the same form). Two schemes use it (`SCHEMES`, the names of `--quantization`):
- `int8`: weight-only (W8A16). Activations stay in the model's dtype; y = (x q^T) s.
- `w8a8_int8` (SGLang's name): activations are quantized too, per token, at run time
  (dynamic), the same way: x[m] -> qx[m] = clamp(round(x[m] / t[m]), -128, 127),
  t[m] = max_k |x[m, k]| / 127.5, and y = (qx q^T) t s, the sum in integers. Faster where
  matmuls are bound by arithmetic (a CPU with AVX-512 VNNI at large batches); less exact.

The kernel sets (dispatch.py) may repack an Int8Weight for their own matmul (`pack_int8`: the
CPU C kernels' VNNI layout); `int8_linear` here is the PyTorch set's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --quantization name -> whether activations are quantized too (W8A8).
SCHEMES = {"int8": False, "w8a8_int8": True}


@dataclass(frozen=True)
class Int8Weight:
    """W ~ qweight * scales[:, None]: qweight int8 [N, K], scales float32 [N]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    dynamic_activations: bool

    def plain(self) -> Int8Weight:
        """This weight as qweight and scales (a kernel set's packed form gives them back)."""
        return self

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantize_int8(weight: torch.Tensor, dynamic_activations: bool) -> Int8Weight:
    """Symmetric int8 per output channel (row), as `_symmetric_int8_rows`; a row of zeros gets
    scale 0."""
    qweight, scales = _symmetric_int8_rows(weight)
    return Int8Weight(qweight, scales, dynamic_activations)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (int8 [rows, K], float32 scales [rows]), each row as
    `_symmetric_int8_rows` (in float32, as the C kernel computes it, so that the two agree
    exactly)."""
    return _symmetric_int8_rows(x)


def _symmetric_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x as int8 clamp(round(x * (127.5 / amax)), -128, 127), rounded to nearest
    even, and its scale amax / 127.5, in float32."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1)
    # A true division: `127.5 / amax` is computed as 127.5 * (1 / amax), which rounds
    # differently from the kernel's 127.5f / amax and moves some values across a rounding
    # boundary.
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.5) / amax, 0.0)
    q = torch.round(x * inverse[..., None]).clamp(-128, 127).to(torch.int8)
    return q, amax / 127.5


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in x's dtype, summed and scaled in float32 (any device)."""
    rows = x.reshape(-1, x.shape[-1])
    if weight.dynamic_activations:
        q, token_scales = quantize_per_token(rows)
        y = (q.to(torch.float32) @ weight.qweight.to(torch.float32).T) * token_scales[:, None]
    else:
        y = rows.to(torch.float32) @ weight.qweight.to(torch.float32).T
    y = y * weight.scales
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
