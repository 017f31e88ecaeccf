"""Paged attention in Triton: the KV-cache write, a decode kernel and a prefill / chunked-prefill
kernel, and `paged_attention_triton`, a drop-in for `attention.paged_attention`.

Same cache layout and semantics as the PyTorch path (`kernels/pagedserve/kernels/attention.py`, the
reference these kernels are checked against): per layer, K and V each [num_blocks, block_size,
num_kv_heads, head_dim], addressed through each request's block table.

The decode kernel runs one program per (sequence, KV head[, partition]). The query heads that
share the KV head are the rows of one tile, so each K/V position is read once for all of them
and the scores and P @ V are tl.dot products. It walks the context through the block table,
block_n positions at a time, and keeps an online softmax (running max, running sum and a
float32 accumulator), so no context is ever gathered into a contiguous copy. For long contexts
and few requests (split-K, flash-decoding) each context is cut into partitions read by programs
of their own, whose softmax states a second kernel merges. Only positions inside the context and
the sliding window are read; they are masked both when loading and in the scores, so unused
cache slots (whatever they hold, NaN included) never reach the output.

The prefill kernel runs one program per (sequence, KV head, tile of BLOCK_M rows), a row being
one (token of the chunk, query head of that KV head) pair: the group's query heads share every
K/V tile (read once for all of them, as in decode), and a chunk of a few tokens (a speculative
verify, a short prompt) still fills a tile. Groups wider than MAX_TILE_HEADS (multi-query
models) are cut into chunks of heads, a program each, so that a tile still holds several
tokens. It walks the context in tiles of BLOCK_N positions
that are whole KV blocks (or part of one when the block is larger), so each tile loads one
table entry per block, not one per position; any power-of-two block size works. Same online
softmax per row (in the log2 domain: exp2), the scores and P @ V as tl.dot with float32 results
(IEEE, not TF32, for float32 inputs). It reads only tiles up to its last token's position and,
with a window, from its first token's window start; causality and the window are masked per
(row, position), and only on the tiles that need it: a tile that every row of the program sees
whole runs without masks. When no chunk of the batch has cached context (a batch of new
prompts), it reads the step's own K/V rows instead of the cache (varlen attention: no block
table at all), the same values, as the PyTorch path does too.

The executor runs these through kernels/pagedserve/kernels/dispatch.py. Tile shapes come from
heuristics (`Tiles`), not @triton.autotune, which fails under TRITON_INTERPRET=1 (how these kernels
are tested on CPU); benchmarks/bench_kernels_gpu.py measures candidate tiles on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.kernels.attention import FP8_MAX, AttentionMetadata, to_cache_format


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
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store the new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their slots
    (block_id * block_size + offset). Same semantics as `attention.write_kv_cache`;
    a negative slot (padding) is skipped. For an fp8 cache the new rows are converted first,
    by `attention.to_cache_format` (Triton's own fp8 conversion rounds differently in its
    interpreter), and the kernel stores their bytes."""
    if key_cache.dtype in FP8_MAX:
        key = to_cache_format(key, key_cache.dtype, k_scale).view(torch.uint8)
        value = to_cache_format(value, value_cache.dtype, v_scale).view(torch.uint8)
        key_cache, value_cache = key_cache.view(torch.uint8), value_cache.view(torch.uint8)
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


LOG2E = 1.4426950408889634


@triton.jit
def _softcapped(scores, softcap):
    """softcap * tanh(scores / softcap) (Gemma 2), tanh from exp: finite for any score."""
    e = tl.exp(-2.0 * tl.abs(scores / softcap))
    capped = softcap * (1.0 - e) / (1.0 + e)
    return tl.where(scores >= 0, capped, -capped)


@triton.jit
def _from_cache(x, dtype, E4M3_BYTES: tl.constexpr):
    """K or V rows as loaded from the cache, in `dtype` (an fp8 cache's values exactly; its
    scale is applied elsewhere). E4M3_BYTES: x is the bytes of an e4m3 cache on a GPU that has
    no e4m3 conversion (before sm_89), converted in integer arithmetic: its sign, exponent and
    mantissa bits moved into a float16's places make the value times 2^-8, exactly, subnormals
    included (the exponent biases are 7 and 15)."""
    if E4M3_BYTES:
        bits = x.to(tl.uint16)
        half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)
        return (half.to(tl.float32) * 256.0).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _paged_attention_decode_kernel(
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
        q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
        scale, window, softcap, max_blocks,
        stride_qs, stride_qh, stride_os, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, head_dim, num_heads,
        QUERIES_PER_KV: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM_P: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
        NUM_PARTITIONS_P: tl.constexpr, SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr,
        SOFTCAP: tl.constexpr, IEEE: tl.constexpr, E4M3_BYTES: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)

    # The query heads that share this KV head are the rows of one [GROUP_P, head_dim] tile
    # (rows past QUERIES_PER_KV are padding: tl.dot needs at least 16 rows).
    offs_g = tl.arange(0, GROUP_P)
    mask_g = offs_g < QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + offs_g
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_d = offs_d < head_dim
    mask_q = mask_g[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_q, other=0.0)

    # The query sits at position seq_len - 1 and sees [first_pos, seq_len); this program reads
    # the part of that inside its partition.
    if USE_WINDOW:
        first_pos = tl.maximum(seq_len - window, 0)
    else:
        first_pos = seq_len * 0
    if SPLIT:
        part_start = part * PARTITION_SIZE
        part_end = tl.minimum(part_start + PARTITION_SIZE, seq_len)
    else:
        part_start = seq_len * 0
        part_end = seq_len
    lo = tl.maximum(part_start, (first_pos // BLOCK_N) * BLOCK_N)

    # Its own loop rather than the prefill kernel's _attend_tile: a decode tile needs only a
    # 1-D position mask, and sharing the prefill's 2-D causal step cost a quarter of the
    # bandwidth on an H200 (docs/performance.md, "Triton kernels on a GPU").
    # Finite start: a tile whose scores are all masked leaves the state unchanged (no NaN).
    m_i = tl.full([GROUP_P], -1e30, dtype=tl.float32)
    l_i = tl.full([GROUP_P], 0.0, dtype=tl.float32)
    acc = tl.full([GROUP_P, HEAD_DIM_P], 0.0, dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, part_end, BLOCK_N):
        k_pos = n0 + offs_n
        # Only positions inside the context (and window) are loaded: an unwritten slot or a
        # padded table entry may hold anything, NaN included.
        valid = (k_pos < part_end) & (k_pos >= first_pos) & (k_pos >= part_start)
        block = tl.load(table_row + k_pos // BLOCK_SIZE,
                        mask=valid & (k_pos // BLOCK_SIZE < max_blocks), other=0).to(tl.int64)
        offs_t = k_pos % BLOCK_SIZE
        load_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(key_cache_ptr + block[:, None] * stride_kb + offs_t[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=load_mask, other=0.0)
        k = _from_cache(k, q.dtype, E4M3_BYTES)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale
        if SOFTCAP:
            scores = _softcapped(scores, softcap)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(value_cache_ptr + block[:, None] * stride_vb + offs_t[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=load_mask, other=0.0)
        v = _from_cache(v, q.dtype, E4M3_BYTES)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    if SPLIT:
        # Unnormalised partial state; _paged_attention_reduce_kernel merges the partitions.
        row = (seq * num_heads + heads).to(tl.int64) * NUM_PARTITIONS_P + part
        tl.store(part_max_ptr + row, m_i, mask=mask_g)
        tl.store(part_sum_ptr + row, l_i, mask=mask_g)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM_P + offs_d[None, :], acc,
                 mask=mask_g[:, None])
    else:
        out = acc / tl.where(mask_g, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_q)


@triton.jit
def _paged_attention_reduce_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
                                   stride_os, stride_oh, head_dim, num_heads, num_partitions,
                                   HEAD_DIM_P: tl.constexpr, NUM_PARTITIONS_P: tl.constexpr):
    """Merges the partitions' online-softmax states of one (sequence, query head). A partition
    that saw no position (past a shorter sequence's end, or before its window) holds max -1e30
    and sum 0, so its weight is 0."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = tl.arange(0, NUM_PARTITIONS_P)
    mask_p = offs_p < num_partitions
    offs_d = tl.arange(0, HEAD_DIM_P)
    row = (seq * num_heads + head).to(tl.int64) * NUM_PARTITIONS_P
    m = tl.load(part_max_ptr + row + offs_p, mask=mask_p, other=-1e30)
    s = tl.load(part_sum_ptr + row + offs_p, mask=mask_p, other=0.0)
    acc = tl.load(part_acc_ptr + (row + offs_p)[:, None] * HEAD_DIM_P + offs_d[None, :],
                  mask=mask_p[:, None], other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(s * weight, axis=0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def _checked_output(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, num_seqs: int, sliding_window: int | None,
                    out: torch.Tensor | None) -> torch.Tensor:
    """Checks what both attention kernels assume of their inputs; returns the output tensor."""
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    assert cache_head_dim == head_dim and value_cache.shape == key_cache.shape
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert block_tables.shape[0] == num_seqs
    assert query.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
    assert block_tables.stride(-1) == 1
    assert sliding_window is None or sliding_window >= 1
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    return out


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                          device: torch.device) -> int | None:
    """Split-K (flash-decoding) for long contexts and few requests: with fewer (sequence, KV
    head) programs than the GPU has multiprocessors x 2, each sequence's context is split into
    partitions of DECODE_PARTITION_SIZE positions, read in parallel and merged after. None: no
    split (many programs already, or a short context, or not a GPU).

    The threshold comes from H200 measurements (docs/performance.md, "Triton kernels on a
    GPU"): splitting pays with few programs and long contexts, and costs with many."""
    traits = gpu(device)
    if traits is None or max_seq_len <= DECODE_PARTITION_SIZE:
        return None
    if num_seqs * num_kv_heads >= 2 * traits.multiprocessors:
        return None
    return DECODE_PARTITION_SIZE


DECODE_PARTITION_SIZE = 512


@dataclass(frozen=True)
class Tiles:
    """Launch shape of an attention kernel: query rows per program (prefill), context positions
    per step, warps and software-pipeline stages (the last two are ignored by the interpreter).
    Chosen by heuristics rather than @triton.autotune, which fails under TRITON_INTERPRET=1;
    benchmarks/bench_kernels_gpu.py measures the candidates on a GPU."""

    block_m: int  # rows: prefill's tokens x query heads of a KV head; decode's its group
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


DECODE_TILES = Tiles(block_m=16, block_n=64)


def prefill_tiles(max_rows: int, device: torch.device) -> Tiles:
    """Tiles for chunks of up to `max_rows` rows (tokens x the query heads of a KV head)."""
    if gpu(device) is None:  # the interpreter: small tiles keep the checks fast
        return Tiles(block_m=16 if max_rows <= 16 else 32, block_n=32)
    if max_rows <= 16:
        return Tiles(block_m=16, block_n=64)
    if max_rows <= 64:
        return Tiles(block_m=64, block_n=64)
    # The best of the candidates on an H200 for chunks of 512 to 4096 tokens, cached context
    # or not (benchmarks/results/h200-run2.log), measured when a tile's rows were one head's
    # tokens; the grouped kernel's best waits for the next device run (bench_kernels_gpu.py).
    return Tiles(block_m=128, block_n=128, num_warps=8, num_stages=2)


@dataclass(frozen=True)
class Gpu:
    """What the launch choices depend on of the GPU they run on."""

    multiprocessors: int
    shared_memory: int  # bytes a program may opt into
    # Triton converts e4m3 values (sm_89 on: Ada, Hopper); before, the kernels convert an e4m3
    # cache's bytes themselves.
    native_e4m3: bool


@functools.cache
def gpu(device: torch.device) -> Gpu | None:
    """The GPU `device` is, or None for the interpreter (a CPU). The one place the launch
    choices read the device: benchmarks/compile_triton_kernels.py stands a target in here."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return Gpu(properties.multi_processor_count,
               getattr(properties, "shared_memory_per_block_optin", 99 * 1024),
               (properties.major, properties.minor) >= (8, 9))


def fit_shared_memory(tiles: Tiles, head_dim_p: int, element_size: int,
                      shared_memory: int, min_block_m: int = 16) -> Tiles:
    """`tiles` with block_n halved (down to 16), then stages cut to 1, then block_m halved
    (down to `min_block_m`) until the query tile and the K and V tiles in flight,
    (block_m + num_stages x 2 x block_n) x head_dim_p x element_size bytes, fit in
    `shared_memory`. That is what Triton asks of an sm_90 for the prefill kernel's 16-bit
    tiles, exactly, and more than it asks for float32's or decode's
    (benchmarks/compile_triton_kernels.py reports each); float32 or head size 256 at 128 x 128
    do not fit, nor 128 x 128 at 128 on a GPU with 99 KiB (sm_86, sm_89)."""
    def needed(t: Tiles) -> int:
        return (t.block_m + t.num_stages * 2 * t.block_n) * head_dim_p * element_size

    while needed(tiles) > shared_memory and tiles.block_n > 16:
        tiles = dataclasses.replace(tiles, block_n=tiles.block_n // 2)
    if needed(tiles) > shared_memory:
        tiles = dataclasses.replace(tiles, num_stages=1)
    while needed(tiles) > shared_memory and tiles.block_m > min_block_m:
        tiles = dataclasses.replace(tiles, block_m=tiles.block_m // 2)
    return tiles


def _as_loaded(key_cache: torch.Tensor, value_cache: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The caches as the kernels load them, and whether they are e4m3 bytes to convert."""
    traits = gpu(device)
    if key_cache.dtype == torch.float8_e4m3fn and traits is not None and not traits.native_e4m3:
        return key_cache.view(torch.uint8), value_cache.view(torch.uint8), True
    return key_cache, value_cache, False


def _fitted(tiles: Tiles, head_dim_p: int, dtype: torch.dtype, device: torch.device,
            min_block_m: int = 16) -> Tiles:
    traits = gpu(device)
    if traits is None:  # the interpreter has no shared-memory limit
        return tiles
    return fit_shared_memory(tiles, head_dim_p, dtype.itemsize, traits.shared_memory,
                             min_block_m)


def paged_attention_decode_triton(query: torch.Tensor, key_cache: torch.Tensor,
                                  value_cache: torch.Tensor, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None,
                                  out: torch.Tensor | None = None,
                                  max_seq_len: int | None = None,
                                  partition_size: int | None = None,
                                  tiles: Tiles = DECODE_TILES,
                                  softcap: float | None = None) -> torch.Tensor:
    """Decode attention, one query token per request.

    query [num_seqs, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables [num_seqs, max_blocks] (padded, only the first
    ceil(seq_len / block_size) entries of a row are read); seq_lens [num_seqs], every one >= 1,
    the context length including the query token. Query head h reads KV head
    h // (num_heads // num_kv_heads). Returns the output, shaped and typed like query (written
    into `out` when given).

    One program per (sequence, KV head), its query heads as the rows of one tile, walking the
    context tiles.block_n positions at a time. `partition_size` (a multiple of
    tiles.block_n) splits each context into partitions read by programs of their own and
    merged by a second kernel; by default `decode_partition_size` decides from `max_seq_len`
    (the longest context; read from seq_lens, a device sync, when not given).
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert seq_lens.shape == (num_seqs,)
    out = _checked_output(query, key_cache, value_cache, block_tables, num_seqs,
                          sliding_window, out)
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    queries_per_kv = num_heads // num_kv_heads
    # The rows of a tile are the KV head's query heads (tl.dot needs at least 16).
    group_p = max(16, triton.next_power_of_2(queries_per_kv))
    tiles = _fitted(dataclasses.replace(tiles, block_m=group_p),
                    max(16, triton.next_power_of_2(head_dim)), query.dtype, query.device,
                    group_p)
    if partition_size is None:
        partition_size = decode_partition_size(num_seqs, num_kv_heads, max_seq_len, query.device)
    split = partition_size is not None and max_seq_len > partition_size
    if split:
        assert partition_size % tiles.block_n == 0
        num_partitions = triton.cdiv(max_seq_len, partition_size)
    else:
        num_partitions, partition_size = 1, tiles.block_n  # unused: no recompile per length
    partitions_p = triton.next_power_of_2(num_partitions)
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    if split:
        rows = num_seqs * num_heads * partitions_p
        part_acc = torch.empty(rows, head_dim_p, dtype=torch.float32, device=query.device)
        part_max = torch.empty(rows, dtype=torch.float32, device=query.device)
        part_sum = torch.empty(rows, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_max = part_sum = out  # unused
    k, v, e4m3_bytes = _as_loaded(key_cache, value_cache, query.device)
    _paged_attention_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_max, part_sum,
        query, k, v, block_tables, seq_lens,
        float(scale), 0 if sliding_window is None else int(sliding_window),
        float(softcap or 0.0), block_tables.shape[1],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0), head_dim, num_heads,
        QUERIES_PER_KV=queries_per_kv, GROUP_P=group_p,
        BLOCK_SIZE=block_size, HEAD_DIM_P=head_dim_p, BLOCK_N=tiles.block_n,
        PARTITION_SIZE=partition_size, NUM_PARTITIONS_P=partitions_p, SPLIT=split,
        USE_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        IEEE=query.dtype == torch.float32, E4M3_BYTES=e4m3_bytes, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    if split:
        _paged_attention_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, out.stride(0), out.stride(1), head_dim,
            num_heads, num_partitions, HEAD_DIM_P=head_dim_p, NUM_PARTITIONS_P=partitions_p)
    return out


@triton.jit
def _tile_rows(table_row, n0, max_blocks, stride_b, stride_t, offs_n, FRESH: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Offsets of context positions n0 .. n0 + BLOCK_N - 1 from a K/V base pointer. FRESH: the
    chunk's own rows of the step's K/V (position p is row p). Else the paged cache, a tile being
    whole KV blocks (or part of one), so its table entries are one load of one entry per block,
    not one per position; entries past the table's end are not read (their positions lie
    outside the context and are masked by the caller)."""
    if FRESH:
        return (n0 + offs_n).to(tl.int64) * stride_t
    elif BLOCK_SIZE >= BLOCK_N:
        block = tl.load(table_row + n0 // BLOCK_SIZE).to(tl.int64)
        return block * stride_b + (n0 % BLOCK_SIZE + offs_n) * stride_t
    else:
        BLOCKS: tl.constexpr = BLOCK_N // BLOCK_SIZE
        index = n0 // BLOCK_SIZE + tl.arange(0, BLOCKS)
        blocks = tl.load(table_row + index, mask=index < max_blocks, other=0).to(tl.int64)
        rows = blocks[:, None] * stride_b + tl.arange(0, BLOCK_SIZE)[None, :] * stride_t
        return tl.reshape(rows, [BLOCK_N])


@triton.jit
def _attend_tile(acc, m_i, l_i, q, n0, k_base, v_base, table_row, max_blocks,
                 stride_kb, stride_kt, stride_vb, stride_vt,
                 offs_n, offs_d, mask_d, q_pos, seq_len, first_pos, window, qk_scale,
                 softcap, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, EVEN_D: tl.constexpr, USE_WINDOW: tl.constexpr,
                 SOFTCAP: tl.constexpr, IEEE: tl.constexpr, FRESH: tl.constexpr,
                 E4M3_BYTES: tl.constexpr):
    """One step of the online softmax over the context positions n0 .. n0 + BLOCK_N - 1, in
    the log2 domain (scores scaled by scale * log2(e), then exp2). MASKED: some position of the
    tile is outside the context, after a row's own position or outside its window; unmasked
    tiles (every position visible to every row) skip the masks. SOFTCAP: capped in the log2
    domain, by `softcap` * log2(e), which equals capping the natural scores by `softcap`."""
    k_pos = n0 + offs_n
    k_rows = _tile_rows(table_row, n0, max_blocks, stride_kb, stride_kt, offs_n, FRESH,
                        BLOCK_N, BLOCK_SIZE)
    v_rows = _tile_rows(table_row, n0, max_blocks, stride_vb, stride_vt, offs_n, FRESH,
                        BLOCK_N, BLOCK_SIZE)
    k_ptrs = k_base + k_rows[:, None] + offs_d[None, :]
    v_ptrs = v_base + v_rows[:, None] + offs_d[None, :]
    if MASKED:
        # Only positions inside the context are loaded (a padded table entry or an unwritten
        # slot may hold anything, NaN included: 0 * NaN would reach the output through P @ V).
        in_ctx = (k_pos < seq_len) & (k_pos >= first_pos)
        load_mask = in_ctx[:, None] & mask_d[None, :]
    else:
        load_mask = mask_d[None, :]
    if MASKED or not EVEN_D:
        k = _from_cache(tl.load(k_ptrs, mask=load_mask, other=0.0), q.dtype, E4M3_BYTES)
    else:
        k = _from_cache(tl.load(k_ptrs), q.dtype, E4M3_BYTES)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))
    scores = scores * qk_scale
    if SOFTCAP:
        scores = _softcapped(scores, softcap)
    if MASKED:
        allowed = in_ctx[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    if MASKED or not EVEN_D:
        v = _from_cache(tl.load(v_ptrs, mask=load_mask, other=0.0), q.dtype, E4M3_BYTES)
    else:
        v = _from_cache(tl.load(v_ptrs), q.dtype, E4M3_BYTES)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_prefill_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr,
        query_start_loc_ptr, qk_scale, window, softcap,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_bt, max_blocks, head_dim,
        QUERIES_PER_KV: tl.constexpr, HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
        FRESH: tl.constexpr, E4M3_BYTES: tl.constexpr):
    # A program attends HEADS of its KV head's QUERIES_PER_KV query heads (all of them but in
    # groups wider than MAX_TILE_HEADS), head_chunk picking which.
    HEAD_CHUNKS: tl.constexpr = (QUERIES_PER_KV + HEADS - 1) // HEADS
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_CHUNKS
    head_chunk = tl.program_id(1) % HEAD_CHUNKS
    q_block = tl.program_id(2)
    # Row r of the tile is token q_block * BLOCK_Q + r // HEADS of the chunk, query head
    # head_chunk * HEADS + r % HEADS of the group: those heads share each K/V tile. Idle rows:
    # from BLOCK_Q * HEADS on (HEADS not dividing BLOCK_M), and past the group's last head.
    BLOCK_Q: tl.constexpr = BLOCK_M // HEADS
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    if q_block * BLOCK_Q >= q_len:  # the grid covers the longest chunk; shorter ones stop here
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - q_len  # positions cached before this chunk (0 when FRESH)

    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_d = offs_d < head_dim
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = q_block * BLOCK_Q + offs_r // HEADS  # tokens inside the chunk
    group_heads = head_chunk * HEADS + offs_r % HEADS
    heads = kv_head * QUERIES_PER_KV + group_heads
    mask_m = (offs_r < BLOCK_Q * HEADS) & (group_heads < QUERIES_PER_KV) & (offs_m < q_len)
    q_pos = context_len + offs_m
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # This block's rows see [first_pos, last_pos]: causal up to its last token, and with a
    # window nothing at or before (its first token's position - window). Tiles that every row
    # sees whole (before the first token's position, no window) run without masks.
    first_row_pos = context_len + q_block * BLOCK_Q
    last_pos = tl.minimum(first_row_pos + BLOCK_Q, seq_len) - 1
    if USE_WINDOW:
        first_pos = tl.maximum(first_row_pos - window + 1, 0)
        start = (first_pos // BLOCK_N) * BLOCK_N
        full_end = start
    else:
        first_pos = seq_len * 0
        start = seq_len * 0
        full_end = ((first_row_pos + 1) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_P], 0.0, dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # FRESH: K/V are the step's rows, the chunk's first token at row q_start.
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    if FRESH:
        k_base += q_start.to(tl.int64) * stride_kt
        v_base += q_start.to(tl.int64) * stride_vt
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, n0, k_base, v_base, table_row, max_blocks,
            stride_kb, stride_kt, stride_vb, stride_vt,
            offs_n, offs_d, mask_d, q_pos, seq_len, first_pos, window, qk_scale, softcap,
            BLOCK_SIZE, BLOCK_N, False, HEAD_DIM_P == head_dim, USE_WINDOW, SOFTCAP, IEEE,
            FRESH, E4M3_BYTES)
    for n0 in range(full_end, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, n0, k_base, v_base, table_row, max_blocks,
            stride_kb, stride_kt, stride_vb, stride_vt,
            offs_n, offs_d, mask_d, q_pos, seq_len, first_pos, window, qk_scale, softcap,
            BLOCK_SIZE, BLOCK_N, True, HEAD_DIM_P == head_dim, USE_WINDOW, SOFTCAP, IEEE,
            FRESH, E4M3_BYTES)

    # Every valid row sees at least its own position, so l_i > 0 there; the others (past the
    # chunk or the group, never stored) may see nothing: divide them by 1, not 0.
    out = acc / tl.where(mask_m, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh
             + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# The most query heads one prefill program attends: wider groups are cut into chunks of this
# many, each its own program, so that a 128-row tile still holds 8 tokens.
MAX_TILE_HEADS = 16


def paged_attention_prefill_triton(query: torch.Tensor, key_cache: torch.Tensor,
                                   value_cache: torch.Tensor, block_tables: torch.Tensor,
                                   seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                   scale: float, sliding_window: int | None = None,
                                   out: torch.Tensor | None = None,
                                   max_query_len: int | None = None,
                                   tiles: Tiles | None = None,
                                   softcap: float | None = None,
                                   fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                                   ) -> torch.Tensor:
    """Prefill / chunked-prefill attention over a flat batch of query chunks.

    query [num_tokens, num_heads, head_dim] holds each sequence's chunk back to back: sequence i
    owns rows query_start_loc[i] .. query_start_loc[i + 1] - 1 (query_start_loc
    [num_seqs + 1]; rows before query_start_loc[0], e.g. a batch's decodes, are not touched),
    its q_len newest tokens, at positions
    seq_lens[i] - q_len .. seq_lens[i] - 1. Their K/V must already be in the cache. Each row
    attends causally to every position <= its own (and, with a window, > its own - window),
    read through block_tables [num_seqs, max_blocks]. Query head h reads KV head
    h // (num_heads // num_kv_heads). Returns the output, shaped and typed like query (written
    into `out` when given). `max_query_len` (the longest chunk) sizes the grid; without it it is
    read from query_start_loc, a device sync. `tiles` overrides `prefill_tiles`' choice.

    `fresh_kv`: the step's new K and V ([num_tokens, num_kv_heads, head_dim], row for row with
    query), given only when no chunk has cached context (each seq_len is its chunk's length):
    then K/V are read from these rows (varlen attention, no block table) rather than from the
    cache.

    One program per (sequence, KV head, tile of tiles.block_m rows): the rows are
    block_m // heads tokens times `heads` query heads of the KV head, all of the group's but in
    groups wider than MAX_TILE_HEADS (multi-query models: Falcon-7B's 71, StarCoder's 48),
    whose heads are cut into chunks of MAX_TILE_HEADS, each its own program, so that a tile
    still holds several tokens; online softmax over tiles of block_n context positions in
    float32.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.shape == (num_seqs + 1,)
    out = _checked_output(query, key_cache, value_cache, block_tables, num_seqs,
                          sliding_window, out)
    if num_seqs == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    heads = min(group, MAX_TILE_HEADS)
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    # A tile holds at least one token's rows.
    min_block_m = max(16, triton.next_power_of_2(heads))
    if tiles is None:
        tiles = prefill_tiles(max_query_len * heads, query.device)
        tiles = _fitted(dataclasses.replace(tiles, block_m=max(tiles.block_m, min_block_m)),
                        head_dim_p, query.dtype, query.device, min_block_m)
    block_m = max(tiles.block_m, min_block_m)
    if fresh_kv is None:
        k, v, e4m3_bytes = _as_loaded(key_cache, value_cache, query.device)
        strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
                   value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))
    else:
        (k, v), e4m3_bytes = fresh_kv, False
        assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
        assert k.dtype == v.dtype == query.dtype and k.stride(-1) == v.stride(-1) == 1
        strides = (0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1))
    grid = (num_seqs, num_kv_heads * triton.cdiv(group, heads),
            triton.cdiv(max_query_len, block_m // heads))
    _paged_attention_prefill_kernel[grid](
        out, query, k, v, block_tables, seq_lens, query_start_loc,
        float(scale) * LOG2E, 0 if sliding_window is None else int(sliding_window),
        float(softcap or 0.0) * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), *strides,
        block_tables.stride(0), block_tables.shape[1], head_dim,
        QUERIES_PER_KV=group, HEADS=heads, BLOCK_SIZE=block_size, HEAD_DIM_P=head_dim_p,
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, USE_WINDOW=sliding_window is not None,
        SOFTCAP=softcap is not None, IEEE=query.dtype == torch.float32,
        FRESH=fresh_kv is not None, E4M3_BYTES=e4m3_bytes, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    return out


def paged_attention_triton(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                           sliding_window: int | None = None,
                           out: torch.Tensor | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, softcap: float | None = None,
                           fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> torch.Tensor:
    """Drop-in for `attention.paged_attention`: the decode kernel on the first
    meta.num_decodes rows (one token each), the prefill kernel on the chunks after them
    (written into `out` when given). An fp8 cache's scales: k_scale joins the softmax scale,
    v_scale multiplies the output. `fresh_kv` (the step's new K/V, row for row with query):
    when no chunk has cached context and the cache holds the queries' dtype, the prefill
    kernel reads them instead of the cache (the same values; an fp8 cache's are rounded, so
    it is read as the decodes will read it)."""
    scale *= k_scale
    if out is None:
        out = torch.empty_like(query)
    assert out.shape == query.shape and out.dtype == query.dtype
    nd = meta.num_decodes
    if nd:
        paged_attention_decode_triton(query[:nd], key_cache, value_cache,
                                      meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                                      sliding_window, out=out[:nd],
                                      max_seq_len=max(meta.seq_lens_host[:nd]), softcap=softcap)
    if nd < len(meta.query_lens):
        fresh = (fresh_kv is not None and key_cache.dtype == query.dtype
                 and meta.prefills_without_context)
        # The prefill kernel reads its chunks' rows of the whole batch through
        # query_start_loc, which counts from the batch's first row.
        paged_attention_prefill_triton(query, key_cache, value_cache, meta.block_tables[nd:],
                                       meta.seq_lens[nd:], meta.query_start_loc[nd:], scale,
                                       sliding_window, out=out,
                                       max_query_len=max(meta.query_lens[nd:]),
                                       softcap=softcap,
                                       fresh_kv=fresh_kv if fresh else None)
    return out if v_scale == 1.0 else out.mul_(v_scale)
