"""Paged attention in Triton: the KV-cache write and a decode kernel (issue 6, first slice).

Same cache layout and semantics as the PyTorch path (`kernels/attention.py`, the reference these
kernels are checked against): per layer, K and V each [num_blocks, block_size, num_kv_heads,
head_dim], addressed through each request's block table.

The decode kernel runs one program per (sequence, query head). It walks the sequence's blocks
through the block table, one block per iteration, and keeps an online softmax (running max,
running sum and a float32 accumulator), so no context is ever gathered into a contiguous copy.
Only the blocks that hold positions inside the sliding window are read; positions outside the
context or the window are masked both when loading and in the scores, so unused cache slots
(whatever they hold, NaN included) never reach the output.

Not wired into the executor yet; no autotuning (`@triton.autotune` fails under
TRITON_INTERPRET=1, which is how these kernels are tested on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
                           head_dim,
                           HEAD_DIM_P: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing to store
        offs = tl.arange(0, HEAD_DIM_P)
        mask = offs < head_dim
        k = tl.load(key_ptr + token * stride_kt + head * stride_kh + offs, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + head * stride_vh + offs, mask=mask)
        tl.store(key_cache_ptr + slot * stride_kc_slot + head * stride_kc_h + offs, k, mask=mask)
        tl.store(value_cache_ptr + slot * stride_vc_slot + head * stride_vc_h + offs, v,
                 mask=mask)


def write_kv_cache_triton(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their slots
    (block_id * block_size + offset). Same semantics as `kernels.attention.write_kv_cache`;
    a negative slot (padding) is skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and slot_mapping.shape == (num_tokens,)
    assert key_cache.shape[2:] == (num_kv_heads, head_dim) and value_cache.shape == key_cache.shape
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    if num_tokens == 0:
        return
    # A slot is (block, offset) flattened: with a contiguous cache its stride is that of offset.
    _write_kv_cache_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2), value_cache.stride(1), value_cache.stride(2),
        head_dim, HEAD_DIM_P=triton.next_power_of_2(head_dim))


@triton.jit
def _paged_attention_decode_kernel(
        out_ptr, q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
        scale, window,
        stride_qs, stride_qh, stride_os, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, head_dim,
        QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM_P: tl.constexpr,
        USE_WINDOW: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_d = offs_d < head_dim
    offs_t = tl.arange(0, BLOCK_SIZE)
    q = tl.load(q_ptr + seq * stride_qs + head * stride_qh + offs_d, mask=mask_d,
                other=0.0).to(tl.float32)
    q = q * scale

    # The query sits at position seq_len - 1; it sees [first_pos, seq_len).
    if USE_WINDOW:
        first_pos = tl.maximum(seq_len - window, 0)
    else:
        first_pos = seq_len * 0
    first_block = first_pos // BLOCK_SIZE
    num_blocks = (seq_len + BLOCK_SIZE - 1) // BLOCK_SIZE

    # Finite start: a block whose scores are all masked leaves the state unchanged (no NaN).
    m_i = tl.full([], -1e30, dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.full([HEAD_DIM_P], 0.0, dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for b in range(first_block, num_blocks):
        block = tl.load(table_row + b).to(tl.int64)
        pos = b * BLOCK_SIZE + offs_t
        valid = (pos < seq_len) & (pos >= first_pos)
        load_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(key_cache_ptr + block * stride_kb + offs_t[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=load_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(value_cache_ptr + block * stride_vb + offs_t[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=load_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    out = acc / l_i
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)


def paged_attention_decode_triton(query: torch.Tensor, key_cache: torch.Tensor,
                                  value_cache: torch.Tensor, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention, one query token per request.

    query [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables [num_seqs, max_blocks] (padded, only the first
    ceil(seq_len / block_size) entries of a row are read); seq_lens [num_seqs], every one >= 1,
    the context length including the query token. Query head h reads KV head
    h // (num_heads // num_kv_heads). Returns the output, shaped and typed like query (written
    into `out` when given).
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    assert cache_head_dim == head_dim and value_cache.shape == key_cache.shape
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert block_tables.shape[0] == num_seqs and seq_lens.shape == (num_seqs,)
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1
    assert sliding_window is None or sliding_window >= 1
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    if num_seqs == 0:
        return out
    _paged_attention_decode_kernel[(num_seqs, num_heads)](
        out, query, key_cache, value_cache, block_tables, seq_lens,
        float(scale), 0 if sliding_window is None else int(sliding_window),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), head_dim,
        QUERIES_PER_KV=num_heads // num_kv_heads, BLOCK_SIZE=block_size,
        HEAD_DIM_P=triton.next_power_of_2(head_dim), USE_WINDOW=sliding_window is not None)
    return out
