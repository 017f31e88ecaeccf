"""Weight-only quantized matmuls in Triton: out = x W^T (+ bias) with W a GroupedWeight
(quantization.py: W[n, k] = s[n, k / G] * q[n, k] + o[n, k / G], GGUF's formats and
compressed-tensors' group schemes) or a weight-only Int8Weight (one group per row).

Each program computes a tile of BLOCK_M rows x BLOCK_N output channels, walking K by BLOCK_K
columns inside one group (BLOCK_K divides G), so a tile's scales and offsets are one vector
per step. The int8 values are dequantized in float32 by one multiply-add, cast to x's dtype
and multiplied by tl.dot (float32 results; IEEE, not TF32, for float32 x): the arithmetic of
the CPU kernel's path for more than 4 rows. W stays one int8 per value in memory.

The activation-quantized schemes (W8A8 int8; fp8, whose `torch._scaled_mm` runs on the fp8
tensor cores) and shapes whose groups no BLOCK_K divides run the PyTorch path
(`quantization.quantized_linear`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.kernels.quantization import (
    Fp8Weight,
    GroupedWeight,
    Int8Weight,
    QuantizedWeight,
    quantized_linear,
)

BLOCK_M, BLOCK_N = 16, 64


@triton.jit
def _grouped_matmul_kernel(out_ptr, x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, M, N, K, GROUPS,
                           stride_xm, stride_om, GROUP: tl.constexpr, HAS_OFFSETS: tl.constexpr,
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
        q = tl.load(q_ptr + cols[None, :].to(tl.int64) * K + (k0 + offs_k)[:, None],
                    mask=col_ok[None, :], other=0)
        group = cols.to(tl.int64) * GROUPS + k0 // GROUP
        w = q.to(tl.float32) * tl.load(s_ptr + group, mask=col_ok, other=0.0)[None, :]
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


def quantized_linear_triton(x: torch.Tensor, weight: QuantizedWeight,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """As `quantization.quantized_linear`, by the Triton kernel where it applies."""
    if isinstance(weight, Fp8Weight):
        return quantized_linear(x, weight, bias)  # torch._scaled_mm: fp8 tensor cores
    if isinstance(weight, Int8Weight):
        if weight.dynamic_activations:
            return quantized_linear(x, weight, bias)
        weight = GroupedWeight(weight.qweight, weight.scales[:, None])
    n, k = weight.qweight.shape
    block_k = _block_k(weight.group_size)
    if block_k is None:
        return quantized_linear(x, weight, bias)
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        grid = (triton.cdiv(rows.shape[0], BLOCK_M), triton.cdiv(n, BLOCK_N))
        _grouped_matmul_kernel[grid](
            out, rows, weight.qweight, weight.scales,
            weight.scales if weight.offsets is None else weight.offsets,
            out if bias is None else bias, rows.shape[0], n, k, weight.scales.shape[1],
            rows.stride(0), out.stride(0), GROUP=weight.group_size,
            HAS_OFFSETS=weight.offsets is not None, HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k)
    return out.view(*x.shape[:-1], n)
