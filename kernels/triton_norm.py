"""RMSNorm in Triton, matching `kernels.norm.rms_norm` (the PyTorch path and reference).

One program per row: the row is normalised in float32, rounded to the activation dtype, then
scaled by the weight, in that order, as the PyTorch path does. Not wired into the executor yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, x_ptr, w_ptr, stride_x, stride_o, hidden, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> rms_norm over the last dimension; the output dtype is
    that of `weight * x` (as in `kernels.norm.rms_norm`)."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](out, rows, weight, rows.stride(0), out.stride(0),
                                           hidden, float(eps),
                                           BLOCK=triton.next_power_of_2(hidden))
    return out.view(x.shape)
