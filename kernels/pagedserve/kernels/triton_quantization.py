"""Weight-only quantized matmuls in Triton: out = x W^T (+ bias) with W a GroupedWeight
(quantization.py: W[n, k] = s[n, k / G] * q[n, k] + o[n, k / G], GGUF's formats and
compressed-tensors' group schemes) or a weight-only Int8Weight (one group per row).

Each program computes a tile of BLOCK_M rows x BLOCK_N output channels, walking K by BLOCK_K
columns inside one group (BLOCK_K divides G), so a tile's scales and offsets are one vector
per step. The values are dequantized in float32 by one multiply-add, cast to x's dtype and
multiplied by tl.dot (float32 results; IEEE, not TF32, for float32 x): the arithmetic of the
CPU kernel's path for more than 4 rows.

Values of 4, 5 or 6 bits (AWQ, GPTQ and compressed-tensors' W4A16; GGUF's Q4, Q5 and Q6
formats) are held in their bits (`pack_quantized_triton`, `NarrowWeight`): a 4-bit model takes
half a byte a weight on the GPU, as its file does, where a byte each took twice that. Each
channel's low 4 bits are two to a byte along K (what `tl.interleave` puts back in order), and
a 5- or 6-bit value's high bits are a plane of their own, 8 or 4 to a byte, read by the k
they belong to. Other values stay a byte each.

The activation-quantized schemes (W8A8 int8; fp8, whose `torch._scaled_mm` runs on the fp8
tensor cores) and shapes whose groups no BLOCK_K divides run the PyTorch path
(`quantization.quantized_linear`).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pagedserve.kernels.quantization import (
    SIX_BIT_BIAS,
    Fp8Weight,
    GroupedWeight,
    Int8Weight,
    QuantizedWeight,
    dequantize_groups,
    quantized_linear,
    tensor_bytes,
    value_bits,
)

BLOCK_M, BLOCK_N = 16, 64


@dataclasses.dataclass(frozen=True)
class NarrowWeight:
    """A GroupedWeight whose values fit 4, 5 or 6 bits, held in them: `low` uint8 [N, K / 2],
    each value's low 4 bits, k = 2i in the low nibble of byte i and k = 2i + 1 in the high
    one; `high` (5 and 6 bits) uint8 [N, K / 8] or [N, K / 4], the rest of each value, k = 8i
    + j at bit j of byte i (5 bits) or k = 4i + j at bits 2j, 2j + 1 (6 bits). 6-bit values
    (-32..31) are stored plus SIX_BIT_BIAS, so that every stored value is unsigned."""

    low: torch.Tensor
    high: torch.Tensor | None
    bits: int
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.low.shape[1] * 2 // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.low, self.scales,
                            *(t for t in (self.high, self.offsets) if t is not None))

    def values(self, ids: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The int8 values of rows `ids` (all by default)."""
        low = self.low[ids]
        stored = torch.stack([low & 15, low >> 4], dim=-1).flatten(-2)
        if self.high is not None:
            width = self.bits - 4
            high = self.high[ids]
            fields = [(high >> (width * j)) & ((1 << width) - 1) for j in range(8 // width)]
            stored |= torch.stack(fields, dim=-1).flatten(-2) << 4
        values = stored.to(torch.int8)
        return values - SIX_BIT_BIAS if self.bits == 6 else values

    def plain(self) -> GroupedWeight:
        return GroupedWeight(self.values(), self.scales, self.offsets)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W, dequantized (a tied embedding's lookup), read in the packed form."""
        return dequantize_groups(self.values(ids), self.scales[ids],
                                 None if self.offsets is None else self.offsets[ids], dtype)


def pack_quantized_triton(weight: QuantizedWeight) -> QuantizedWeight | NarrowWeight:
    """A GroupedWeight whose values fit 4 to 6 bits as a NarrowWeight (on its device); any
    other weight as it is."""
    if not isinstance(weight, GroupedWeight) or weight.qweight.shape[1] % 8:
        return weight
    bits = value_bits(weight.qweight)
    if bits == 8:
        return weight
    stored = (weight.qweight + SIX_BIT_BIAS if bits == 6 else weight.qweight).to(torch.uint8)
    low = (stored[:, 0::2] & 15) | ((stored[:, 1::2] & 15) << 4)
    high = None
    if bits > 4:
        width = bits - 4
        fields = (stored >> 4).unflatten(1, (-1, 8 // width))
        high = sum(fields[..., j] << (width * j) for j in range(8 // width)).to(torch.uint8)
    return NarrowWeight(low.contiguous(), high, bits, weight.scales, weight.offsets)


@triton.jit
def _grouped_matmul_kernel(out_ptr, x_ptr, q_ptr, high_ptr, s_ptr, o_ptr, bias_ptr, M, N, K,
                           GROUPS, stride_xm, stride_om, BITS: tl.constexpr,
                           GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :],
                    mask=row_ok[:, None], other=0.0)
        if BITS == 8:
            q = tl.load(q_ptr + cols[None, :].to(tl.int64) * K + (k0 + offs_k)[:, None],
                        mask=col_ok[None, :], other=0).to(tl.float32)
        else:
            # [BLOCK_N, BLOCK_K / 2] bytes of low nibbles, put back in k order.
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            low = tl.load(q_ptr + cols[:, None].to(tl.int64) * (K // 2) + offs_b[None, :],
                          mask=col_ok[:, None], other=0)
            q = tl.interleave(low & 15, low >> 4).to(tl.int32)
            if BITS > 4:
                width = BITS - 4  # constexprs, as BITS is
                per_byte = 8 // width
                k = k0 + offs_k
                high = tl.load(high_ptr + cols[:, None].to(tl.int64) * (K // per_byte)
                               + (k // per_byte)[None, :], mask=col_ok[:, None], other=0)
                q = q | (((high.to(tl.int32) >> ((k % per_byte) * width)[None, :])
                          & ((1 << width) - 1)) << 4)
                if BITS == 6:
                    q = q - 32  # SIX_BIT_BIAS
            q = tl.trans(q.to(tl.float32))
        group = cols.to(tl.int64) * GROUPS + k0 // GROUP
        w = q * tl.load(s_ptr + group, mask=col_ok, other=0.0)[None, :]
        if HAS_OFFSETS:
            w += tl.load(o_ptr + group, mask=col_ok, other=0.0)[None, :]
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_k(group: int) -> int | None:
    """The K step: the largest of 64, 32, 16 that divides the group (tl.dot needs 16)."""
    return next((b for b in (64, 32, 16) if group % b == 0), None)


def quantized_linear_triton(x: torch.Tensor, weight: QuantizedWeight | NarrowWeight,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """As `quantization.quantized_linear`, by the Triton kernel where it applies."""
    if isinstance(weight, Fp8Weight):
        return quantized_linear(x, weight, bias)  # torch._scaled_mm: fp8 tensor cores
    if isinstance(weight, Int8Weight):
        if weight.dynamic_activations:
            return quantized_linear(x, weight, bias)
        weight = GroupedWeight(weight.qweight, weight.scales[:, None])
    block_k = _block_k(weight.group_size)
    if block_k is None:
        return quantized_linear(x, weight.plain(), bias)
    narrow = isinstance(weight, NarrowWeight)
    values = weight.low if narrow else weight.qweight
    n, k = values.shape[0], values.shape[1] * (2 if narrow else 1)  # two nibbles a byte
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        grid = (triton.cdiv(rows.shape[0], BLOCK_M), triton.cdiv(n, BLOCK_N))
        # 4- and 8-bit values have no high plane: any pointer, which the kernel never reads.
        high = weight.high if narrow and weight.high is not None else values
        _grouped_matmul_kernel[grid](
            out, rows, values, high, weight.scales,
            weight.scales if weight.offsets is None else weight.offsets,
            out if bias is None else bias, rows.shape[0], n, k, weight.scales.shape[1],
            rows.stride(0), out.stride(0), BITS=weight.bits if narrow else 8,
            GROUP=weight.group_size, HAS_OFFSETS=weight.offsets is not None,
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    return out.view(*x.shape[:-1], n)
