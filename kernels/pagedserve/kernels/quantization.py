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

A weight quantized in groups along K, as GGUF's block formats, AWQ and GPTQ store them, is a
`GroupedWeight`: W[n, k] = scales[n, k // g] * q[n, k] + offsets[n, k // g], with int8 values
q (one per byte here, whatever their width in the file: 4-bit, 6-bit or 8-bit) and float32
scales and offsets per group of g consecutive k (offsets None for symmetric formats). For every
GGUF format we run, float32 holds the scale and offset exactly and s * q is exact too, so
`dequantized` gives the very values the `gguf` package's dequantize gives (docs/quantization.md).
Only weight-only (A16) matmuls run on it.

`--quantization fp8` makes an `Fp8Weight`: e4m3 values with one float32 scale per output
channel (amax / 448), activations quantized to e4m3 per token at run time, and the product by
`torch._scaled_mm`, which fp8 tensor cores run (CUDA compute capability 8.9 and up: Ada,
Hopper); vLLM's and compressed-tensors' FP8_DYNAMIC scheme. Elsewhere `_scaled_mm` is a slow
reference: the engine refuses fp8 on such devices (`fp8_supported`).

The kernel sets (dispatch.py) may repack a quantized weight for their own matmul
(`pack_quantized`: the CPU C kernels' layouts); `quantized_linear` here is the PyTorch set's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The int8 --quantization names -> whether activations are quantized too (W8A8).
SCHEMES = {"int8": False, "w8a8_int8": True}
# Every --quantization name.
METHODS = (*SCHEMES, "fp8")
FP8_MAX = 448.0  # the largest float8_e4m3fn


@dataclass(frozen=True)
class PerChannelWeight:
    """W ~ qweight * scales[:, None]: quantized values [N, K], float32 scales [N]."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def plain(self) -> PerChannelWeight:
        """This weight as qweight and scales (a kernel set's packed form gives them back)."""
        return self

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)


@dataclass(frozen=True)
class Int8Weight(PerChannelWeight):
    """int8 values; activations quantized per token too where `dynamic_activations`."""

    dynamic_activations: bool = False
    activation_levels: float = 127.0


@dataclass(frozen=True)
class GroupedWeight:
    """W ~ qweight * scales + offsets, each scale and offset repeated over its group of
    `group_size` columns: qweight int8 [N, K], scales and offsets float32 [N, K / group_size]
    (offsets None: zero). `int16_activations`: a kernel may multiply W by x rounded to 16-bit
    integers per group, off by at most 2^-16 of the group's largest |x| (GGUF's weights: the CPU
    kernels do for 4-bit values on AVX2, int8_linear.c's grouped_block_a16); the others
    multiply by x as it is."""

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    int16_activations: bool = False

    def plain(self) -> GroupedWeight:
        return self

    @property
    def group_size(self) -> int:
        return self.qweight.shape[1] // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scales,
                            *(() if self.offsets is None else (self.offsets,)))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_groups(self.qweight, self.scales, self.offsets, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W, dequantized (an embedding's lookup)."""
        return dequantize_groups(self.qweight[ids], self.scales[ids],
                                 None if self.offsets is None else self.offsets[ids], dtype)


# What the kernels store 6-bit values plus, so that every stored value is unsigned (the CPU
# kernels' int8_linear.c and the Triton kernel take it back off).
SIX_BIT_BIAS = 32


def value_bits(values: torch.Tensor) -> int:
    """The fewest bits the kernels pack these int8 values in: 4 (0..15), 5 (0..31), 6
    (-32..31) or 8."""
    low, high = int(values.min()), int(values.max())
    return 4 if 0 <= low and high <= 15 else 5 if 0 <= low and high <= 31 \
        else 6 if -32 <= low and high <= 31 else 8


def dequantize_groups(values: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """s * q + o per group, in float32 (s * q is exact for the formats we load, so this rounds
    once, as a fused multiply-add would), then cast to `dtype`."""
    g = values.shape[1] // scales.shape[1]
    w = values.to(torch.float32) * scales.repeat_interleave(g, dim=1)
    if offsets is not None:
        w = w + offsets.repeat_interleave(g, dim=1)
    return w.to(dtype)


@dataclass(frozen=True)
class Fp8Weight(PerChannelWeight):
    """float8_e4m3fn values; activations quantized per token at run time (`fp8_linear`)."""


QuantizedWeight = Int8Weight | GroupedWeight | Fp8Weight


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedWeight:
    """`weight` quantized as `--quantization method` does it (a name of METHODS)."""
    if method == "fp8":
        return quantize_fp8(weight)
    return quantize_int8(weight, SCHEMES[method])


def fp8_supported(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 in hardware (what `--quantization fp8` needs)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    """Each row of `weight` as e4m3 with its scale amax / 448 (rounded to nearest even, as
    PyTorch converts); a row of zeros gets scale 0."""
    qweight, scales = _fp8_rows(weight)
    return Fp8Weight(qweight, scales)


def _fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x as float8_e4m3fn x / s, s = amax / 448 (rounded to nearest even by the
    conversion), and s."""
    scaled, scales = _scaled_rows(x, FP8_MAX)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


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
    scaled, scales = _scaled_rows(x, levels)
    lowest = -128 if levels > 127 else -127
    return torch.round(scaled).clamp(lowest, 127).to(torch.int8), scales


def _scaled_rows(x: torch.Tensor, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x in float32 times levels / amax (0 for a row of zeros), and its scale
    amax / levels."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=-1)
    # A true division: `levels / amax` is computed as levels * (1 / amax), which rounds
    # differently from the kernel's levels / amax and moves some values across a rounding
    # boundary.
    inverse = torch.where(amax > 0, torch.full_like(amax, levels) / amax, 0.0)
    return x * inverse[..., None], amax / levels


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in x's dtype, summed and scaled in float32 (any device)."""
    if isinstance(weight, GroupedWeight):
        return grouped_linear(x, weight, bias)
    if isinstance(weight, Fp8Weight):
        return fp8_linear(x, weight, bias)
    return int8_linear(x, weight, bias)


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) with x quantized to e4m3 per token (dynamic, amax / 448): on a GPU by
    `scaled_mm` where its shapes fit (K and N multiples of 16), else by the same quantized
    operands dequantized, in float32 (CPU's _scaled_mm is a slow reference that rounds the
    scaled operands to bfloat16)."""
    rows = x.reshape(-1, x.shape[-1])
    q, token_scales = _fp8_rows(rows)
    n, k = weight.qweight.shape
    if x.device.type == "cuda" and k % 16 == 0 and n % 16 == 0:
        y = scaled_mm(q, token_scales, weight)
    else:
        y = (q.to(torch.float32) * token_scales[:, None]) @ weight.dequantized(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def scaled_mm(q: torch.Tensor, token_scales: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """(q · token_scales) (W)^T in float32 by torch._scaled_mm: e4m3 operands, scaled per row
    and per output channel, bfloat16 results (what fp8 tensor cores take)."""
    return torch._scaled_mm(q, weight.qweight.T, scale_a=token_scales[:, None],
                            scale_b=weight.scales[None, :],
                            out_dtype=torch.bfloat16).to(torch.float32)


def grouped_linear(x: torch.Tensor, weight: GroupedWeight,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) by the dequantized weight, in float32 (any device; a dequantized copy per
    call: the fallback where no kernel reads the groups)."""
    y = torch.nn.functional.linear(x.to(torch.float32), weight.dequantized(torch.float32),
                                   None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)


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
