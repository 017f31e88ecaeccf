"""Rotary position embedding in Triton, matching `rotary.apply_rotary` (the PyTorch path
and reference): neox (rotate-half) and GPT-J (interleaved) styles, partial rotary (channels past
`rotary_dim` copied unchanged).

One program per (token, head): the token's cos / sin row is read once from the cache, rounded
to the activation dtype as the PyTorch path does, and the products are taken in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(out_ptr, x_ptr, pos_ptr, cos_sin_ptr, stride_xt, stride_xh, stride_ot,
                   stride_oh, stride_cs, head_dim, half,
                   HALF_P: tl.constexpr, REST_P: tl.constexpr, NEOX: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs = tl.arange(0, HALF_P)
    mask = offs < half
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs, mask=mask, other=0.0)
    cos = cos.to(x_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(x_ptr.dtype.element_ty).to(tl.float32)
    x_row = x_ptr + token.to(tl.int64) * stride_xt + head * stride_xh
    o_row = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh
    if NEOX:  # pairs (i, i + half)
        first, second = offs, offs + half
    else:  # pairs (2i, 2i + 1)
        first, second = 2 * offs, 2 * offs + 1
    x1 = tl.load(x_row + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + second, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if REST_P > 0:  # partial rotary: the channels past rotary_dim pass through
        rest = 2 * half + tl.arange(0, REST_P)
        rest_mask = rest < head_dim
        tl.store(o_row + rest, tl.load(x_row + rest, mask=rest_mask), mask=rest_mask)


def apply_rotary_triton(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        neox_style: bool = True) -> torch.Tensor:
    """x [num_tokens, num_heads, head_dim]; cos_sin_cache [max_position, rotary_dim] holding
    cos in the first half and sin in the second. Returns a new tensor, like the PyTorch path."""
    num_tokens, num_heads, head_dim = x.shape
    rotary_dim = cos_sin_cache.shape[-1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and positions.shape == (num_tokens,)
    assert x.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    rest = head_dim - rotary_dim
    _rotary_kernel[(num_tokens, num_heads)](
        out, x, positions, cos_sin_cache, x.stride(0), x.stride(1), out.stride(0),
        out.stride(1), cos_sin_cache.stride(0), head_dim, rotary_dim // 2,
        HALF_P=triton.next_power_of_2(rotary_dim // 2),
        REST_P=triton.next_power_of_2(rest) if rest else 0, NEOX=neox_style)
    return out
