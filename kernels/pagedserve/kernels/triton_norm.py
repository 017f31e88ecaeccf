"""RMSNorm and the fused residual-add + RMSNorm in Triton, matching `norm` (the PyTorch
path and reference).

One program per row: the row (with the fused variant, x + residual rounded to the activation
dtype, which is also stored as the next residual) is normalised in float32, rounded to the
activation dtype, then scaled by the weight, in that order, as the PyTorch path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, x_ptr, res_ptr, res_out_ptr, w_ptr, stride_x, stride_r,
                     stride_ro, stride_o, hidden, eps,
                     BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    res_rows = res_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        res_rows = _rows(residual)
        res_out = torch.empty_like(rows)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            out, rows, rows if res_rows is None else res_rows,
            rows if res_out is None else res_out, weight, rows.stride(0),
            0 if res_rows is None else res_rows.stride(0),
            0 if res_out is None else res_out.stride(0), out.stride(0), hidden, float(eps),
            BLOCK=triton.next_power_of_2(hidden), ADD_RESIDUAL=residual is not None)
    return out.view(x.shape), None if res_out is None else res_out.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> rms_norm over the last dimension; the output dtype is
    that of `weight * x` (as in `norm.rms_norm`)."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) in one pass over the row, as
    `norm.add_rms_norm`."""
    return _launch(x, residual, weight, eps)
