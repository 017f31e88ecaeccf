"""Int8 weights (docs/quantization.md): quantizing a float weight per output channel, quantizing
activations per token, and the PyTorch matmuls on them, which every device can run.

A linear layer's weight W [N, K] becomes `Int8Weight`: int8 values q [N, K] and one float32
scale per output channel, s[n] = max_k |W[n, k]| / 127, with q = round(W / s) (rounded to
nearest even). A quantized checkpoint's int8 weights load into the same form, with their own
scales. Two schemes use it (`SCHEMES`, the names of `--quantization`):
- `int8`: weight-only (W8A16). Activations stay in the model's dtype; y = (x q^T) s.
- `w8a8_int8` (SGLang's name): activations are quantized too, per token, at run time
  (dynamic): x[m] -> qx[m] = round(x[m] / t[m]), t[m] = max_k |x[m, k]| / L, and
  y = (qx q^T) t s, the sum in integers. L (`activation_levels`) is 127, the values in
  [-127, 127], as vLLM does; a compressed-tensors W8A8 checkpoint defines L = 127.5 with values
  in [-128, 127], and runs so. Faster where matmuls are bound by arithmetic (a CPU with AVX-512
  VNNI at large batches); less exact.

Why 127 for what we quantize: 127.5 rounds each row's largest positive value down to 127 of
128 steps, and those largest values matter most. On the default model the weights quantized
with 127.5 gave +0.72% perplexity against bf16, with 127 +0.03% (docs/performance.md).

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
    activation_levels: float = 127.0

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
    """Symmetric int8 per output channel (row), as `_symmetric_int8_rows` with 127 levels; a row
    of zeros gets scale 0."""
    qweight, scales = _symmetric_int8_rows(weight, 127.0)
    return Int8Weight(qweight, scales, dynamic_activations)


def quantize_per_token(x: torch.Tensor, levels: float = 127.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, K] -> (int8 [rows, K], float32 scales [rows]), each row as
    `_symmetric_int8_rows` (in float32, as the C kernel computes it, so that the two agree
    exactly)."""
    return _symmetric_int8_rows(x, levels)


def _symmetric_int8_rows(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x as int8 clamp(round(x * (levels / amax)), lowest, 127), rounded to nearest
    even, and its scale amax / levels, in float32; lowest is -128 for 127.5 levels (as
    compressed-tensors), else -127."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1)
    # A true division: `levels / amax` is computed as levels * (1 / amax), which rounds
    # differently from the kernel's levels / amax and moves some values across a rounding
    # boundary.
    inverse = torch.where(amax > 0, torch.full_like(amax, levels) / amax, 0.0)
    lowest = -128 if levels > 127 else -127
    q = torch.round(x * inverse[..., None]).clamp(lowest, 127).to(torch.int8)
    return q, amax / levels


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in x's dtype, summed and scaled in float32 (any device)."""
    rows = x.reshape(-1, x.shape[-1])
    if weight.dynamic_activations:
        q, token_scales = quantize_per_token(rows, weight.activation_levels)
        y = (q.to(torch.float32) @ weight.qweight.to(torch.float32).T) * token_scales[:, None]
    else:
        y = rows.to(torch.float32) @ weight.qweight.to(torch.float32).T
    y = y * weight.scales
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
