"""The Triton kernels against the PyTorch path (kernels/pagedserve/kernels/attention.py,
kernels/pagedserve/kernels/norm.py), run on CPU through Triton's interpreter. bf16 is left out: the
interpreter's bf16 arithmetic is wrong."""

import math

import pytest
import torch

# tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton. The kernel modules
# import triton, so they come after this check.
triton = pytest.importorskip("triton", reason="triton cannot be imported; the Triton kernels "
                             "are not tested")

from pagedserve.kernels.activation import silu_and_mul  # noqa: E402
from pagedserve.kernels.attention import (  # noqa: E402
    AttentionMetadata,
    paged_attention,
    to_cache_format,
    write_kv_cache,
)
from pagedserve.kernels.norm import add_rms_norm, rms_norm  # noqa: E402
from pagedserve.kernels.rotary import apply_rotary  # noqa: E402
from pagedserve.kernels.triton_activation import silu_and_mul_triton  # noqa: E402
from pagedserve.kernels.triton_attention import (  # noqa: E402
    Tiles,
    _from_cache,
    paged_attention_decode_triton,
    paged_attention_prefill_triton,
    paged_attention_triton,
    write_kv_cache_triton,
)
from pagedserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton  # noqa: E402
from pagedserve.kernels.triton_rotary import apply_rotary_triton  # noqa: E402
from pagedserve.testing.paged_batches import BLOCK, build_batch, mixed_batch  # noqa: E402

# Context lengths (query token included) of a ragged decode batch: one token, a block but one,
# a full block, one past a block, and a few blocks.
SEQ_LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_cache_matches_torch(dtype):
    gen = torch.Generator().manual_seed(10 + (dtype == torch.float16))
    key_cache, value_cache, _, keys, values, slots = build_batch(gen, dtype, 2, 64, SEQ_LENS)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    write_kv_cache(keys, values, ref_k, ref_v, slots)
    write_kv_cache_triton(keys, values, key_cache, value_cache, slots)
    # Exact, NaN where nothing was written: no slot outside slot_mapping is touched.
    torch.testing.assert_close(key_cache, ref_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, ref_v, rtol=0, atol=0, equal_nan=True)


def test_write_kv_cache_skips_padding_slots():
    gen = torch.Generator().manual_seed(12)
    key_cache, value_cache, _, keys, values, slots = build_batch(gen, torch.float32, 1, 64,
                                                                 [3])
    padded = slots.clone()
    padded[1] = -1
    write_kv_cache_triton(keys, values, key_cache, value_cache, padded)
    flat_k = key_cache.view(-1, 1, 64)
    torch.testing.assert_close(flat_k[slots[[0, 2]]], keys[[0, 2]], rtol=0, atol=0)
    assert flat_k[slots[1]].isnan().all()
    assert (~flat_k.isnan().any(-1).any(-1)).sum() == 2


# (dtype, num_heads, num_kv_heads, head_dim, sliding_window): GQA (4 query heads per KV head),
# MQA and plain multi-head, head sizes 64, 80, 96, 128 and 256, windows inside one block and
# across blocks.
CASES = [
    (torch.float32, 8, 2, 64, None),
    (torch.float16, 8, 2, 128, None),
    (torch.float32, 4, 1, 128, None),
    (torch.float16, 2, 2, 64, BLOCK + 4),
    (torch.float32, 4, 1, 64, 7),
    (torch.float16, 8, 2, 64, BLOCK),
    (torch.float16, 4, 2, 80, None),
    (torch.float32, 2, 1, 96, 2 * BLOCK + 3),
    (torch.float16, 2, 1, 256, None),
]
# Split-K decode: partitions of 64 positions (four blocks); contexts inside the first
# partition, at its edges, and over several, the longest past a window's reach.
SPLIT_SEQ_LENS = [1, 63, 64, 65, 200, 129]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_decode_matches_torch(case):
    check_decode(case, SEQ_LENS, partition_size=None, seed=100)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_decode_split_k_matches_torch(case):
    check_decode(case, SPLIT_SEQ_LENS, partition_size=64, seed=400)


@pytest.mark.parametrize("case", [0, 3])
def test_paged_attention_decode_split_k_with_a_bound_on_the_contexts(case):
    """As a decode CUDA graph runs it (executor/decode_graphs.py): the grid sized for contexts
    up to max_model_len, here 8 partitions, the last 4 past every sequence's end."""
    check_decode(case, SPLIT_SEQ_LENS, partition_size=64, seed=700, max_seq_len=512)


def check_decode(case, seq_lens, partition_size, seed, max_seq_len=None):
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(seed + case)
    seq_lens = seq_lens[:]
    order = torch.randperm(len(seq_lens), generator=gen).tolist()
    seq_lens = [seq_lens[i] for i in order]
    num_blocks = sum(-(-n // BLOCK) for n in seq_lens) + 4
    key_cache, value_cache, tables, keys, values, slots = build_batch(
        gen, dtype, num_kv_heads, head_dim, seq_lens, num_blocks=num_blocks)
    write_kv_cache_triton(keys, values, key_cache, value_cache, slots)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    seq_lens_t = torch.tensor(seq_lens)

    out = torch.full_like(query, float("nan"))
    result = paged_attention_decode_triton(query, key_cache, value_cache, tables, seq_lens_t,
                                           scale, window, out=out,
                                           partition_size=partition_size,
                                           max_seq_len=max_seq_len)
    assert result is out

    # The PyTorch path gathers whole blocks and masks the scores (0 * NaN is NaN), so it reads
    # caches whose unwritten slots are zero; the Triton kernel reads the NaN-poisoned ones.
    meta = AttentionMetadata.build(slots[:0], tables, [1] * len(seq_lens), seq_lens)
    expected = paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0),
                               meta, scale, window)
    assert not expected.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


# A mixed batch: decodes (context length, query token included), then prefill chunks as
# (cached context, chunk length): contexts of 0, a block but one, a block, one past a block and a
# few blocks; chunks of one token, under a block, past a block and past two query tiles.
DECODES = [BLOCK + 1, 1, 2 * BLOCK]
PREFILLS = [(0, 20), (BLOCK - 1, 1), (BLOCK, 17), (BLOCK + 1, 5), (2 * BLOCK + 3, 35)]


def reference(query, key_cache, value_cache, meta, scale, window):
    # The PyTorch path reads caches whose unwritten slots are zero (see the decode test).
    expected = paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0),
                               meta, scale, window)
    assert not expected.isnan().any()
    return expected


@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_mixed_batch_matches_torch(case):
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(200 + case)
    key_cache, value_cache, query, meta = mixed_batch(gen, dtype, num_heads, num_kv_heads,
                                                      head_dim, DECODES, PREFILLS)
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(query, float("nan"))
    assert paged_attention_triton(query, key_cache, value_cache, meta, scale, window,
                                  out=out) is out
    expected = reference(query, key_cache, value_cache, meta, scale, window)
    tol = TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", [0, 3])
@pytest.mark.parametrize("partition_size", [None, 64])
def test_soft_capped_scores_match_torch(case, partition_size):
    """Gemma 2's cap (0.5: it changes every score) in the decode kernel, whole and split-K,
    and in the prefill kernel; the capped output differs from the uncapped one."""
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(260 + case)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, dtype, num_heads, num_kv_heads, head_dim, [1, 2 * BLOCK, 129], PREFILLS)
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention_triton(query, key_cache, value_cache, meta, scale, window,
                                 softcap=0.5)
    nd = meta.num_decodes
    paged_attention_decode_triton(query[:nd], key_cache, value_cache, meta.block_tables[:nd],
                                  meta.seq_lens[:nd], scale, window, out=out[:nd],
                                  partition_size=partition_size, softcap=0.5)
    expected = paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0),
                               meta, scale, window, softcap=0.5)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])
    uncapped = reference(query, key_cache, value_cache, meta, scale, window)
    assert (out.float() - uncapped.float()).abs().max() > 10 * TOL[dtype]


@pytest.mark.parametrize("dtype, window", [(torch.float32, None), (torch.float16, 9)])
def test_paged_attention_prefill_writes_out(dtype, window):
    """The prefill kernel alone (no decodes), into a NaN-poisoned `out`, its grid sized from
    query_start_loc: every row is written, none is NaN."""
    gen = torch.Generator().manual_seed(300 + (dtype == torch.float16))
    key_cache, value_cache, query, meta = mixed_batch(gen, dtype, 4, 2, 64, [], PREFILLS[:4])
    scale = 0.125
    out = torch.full_like(query, float("nan"))
    result = paged_attention_prefill_triton(query, key_cache, value_cache, meta.block_tables,
                                            meta.seq_lens, meta.query_start_loc, scale, window,
                                            out=out)
    assert result is out
    tol = TOL[dtype]
    torch.testing.assert_close(out, reference(query, key_cache, value_cache, meta, scale, window),
                               rtol=tol, atol=tol)


# The prefill kernel's tiles against the cache's blocks: a tile inside one block (one table
# entry), a tile of one block, of two and of four blocks; with groups of 3 query heads a KV
# head (not a power of two: the tile's last rows idle) and of 20 (wider than the tile's rows).
@pytest.mark.parametrize("block_size, tiles", [
    (64, Tiles(16, 32)), (16, Tiles(16, 16)), (16, Tiles(32, 32)), (8, Tiles(16, 32))])
@pytest.mark.parametrize("num_heads, num_kv_heads, window", [(6, 2, None), (20, 1, 9)])
def test_prefill_tiles_of_whole_blocks_and_grouped_heads(block_size, tiles, num_heads,
                                                         num_kv_heads, window):
    gen = torch.Generator().manual_seed(320 + block_size + num_heads)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, torch.float32, num_heads, num_kv_heads, 32, [], PREFILLS, num_blocks=64,
        block_size=block_size)
    out = torch.full_like(query, float("nan"))
    paged_attention_prefill_triton(query, key_cache, value_cache, meta.block_tables,
                                   meta.seq_lens, meta.query_start_loc, 0.2, window, out=out,
                                   tiles=tiles)
    torch.testing.assert_close(out, reference(query, key_cache, value_cache, meta, 0.2, window),
                               rtol=1e-5, atol=1e-5)


def step_rows(cache, meta):
    """The rows of `cache` ([num_blocks, block_size, heads, head_dim]) at each query token's
    own position, row for row with the flat batch: the step's new K or V."""
    block_size = cache.shape[1]
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens_host, strict=True)):
        positions = torch.arange(seq_len - q_len, seq_len)
        slots.append(meta.block_tables[i, positions // block_size] * block_size
                     + positions % block_size)
    slots = torch.cat(slots)
    return cache.view(-1, *cache.shape[2:])[slots].clone(), slots


@pytest.mark.parametrize("dtype, window", [(torch.float32, None), (torch.float16, 9)])
def test_prefill_without_cached_context_reads_the_steps_rows(dtype, window):
    """Varlen: when no chunk has cached context, the prefill kernel reads the step's own K/V
    rows, not the cache (whose copies of them are NaN here); the decodes still read the cache."""
    gen = torch.Generator().manual_seed(340 + (dtype == torch.float16))
    key_cache, value_cache, query, meta = mixed_batch(gen, dtype, 8, 2, 64, [BLOCK + 1, 3],
                                                      [(0, 20), (0, 5), (0, 40)])
    expected = reference(query, key_cache, value_cache, meta, 0.125, window)
    (keys, slots), (values, _) = step_rows(key_cache, meta), step_rows(value_cache, meta)
    chunks = slots[meta.num_decodes:]
    for cache in key_cache, value_cache:
        cache.view(-1, *cache.shape[2:])[chunks] = float("nan")
    out = paged_attention_triton(query, key_cache, value_cache, meta, 0.125, window,
                                 fresh_kv=(keys, values))
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_prefill_reads_the_cache_where_the_steps_rows_would_differ(cache_dtype):
    """With a chunk over cached context, or an fp8 cache (whose rounded values the decodes
    will read), the prefill kernel reads the cache: the step's rows given (NaN) are unused."""
    gen = torch.Generator().manual_seed(350)
    prefills = [(0, 20), (BLOCK, 17)] if cache_dtype is None else [(0, 20), (0, 9)]
    key_cache, value_cache, query, meta = mixed_batch(gen, torch.float32, 8, 2, 64, [3],
                                                      prefills)
    key_cache, value_cache = (c.nan_to_num(0.0) for c in (key_cache, value_cache))
    if cache_dtype is not None:
        key_cache, value_cache = (to_cache_format(c, cache_dtype, 1.0)
                                  for c in (key_cache, value_cache))
    nan_rows = torch.full((query.shape[0], 2, 64), float("nan"))
    out = paged_attention_triton(query, key_cache, value_cache, meta, 0.125,
                                 fresh_kv=(nan_rows, nan_rows))
    torch.testing.assert_close(out, paged_attention(query, key_cache, value_cache, meta, 0.125),
                               rtol=1e-5, atol=1e-5)


@triton.jit
def _convert_bytes(x_ptr, out_ptr, E4M3_BYTES: triton.language.constexpr):
    offs = triton.language.arange(0, 256)
    values = _from_cache(triton.language.load(x_ptr + offs), triton.language.float32, E4M3_BYTES)
    triton.language.store(out_ptr + offs, values)


def test_e4m3_bytes_convert_exactly():
    """The kernels' own e4m3 conversion (GPUs before sm_89) against PyTorch's, every byte but
    the two NaNs: exact, subnormals and both zeros included."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = every.view(torch.float8_e4m3fn).float()
    out = torch.full((256,), float("nan"))
    _convert_bytes[(1,)](every, out, E4M3_BYTES=True)
    finite = ~expected.isnan()
    assert finite.sum() == 254
    assert torch.equal(out[finite], expected[finite])
    assert torch.equal(out[finite].signbit(), expected[finite].signbit())


@pytest.mark.parametrize("with_decodes", [True, False])
def test_attention_reads_e4m3_bytes_where_the_gpu_cannot_convert(monkeypatch, with_decodes):
    """On a GPU without e4m3 conversions (an A100 stood in, its launch choices with it) the
    wrappers hand the kernels the cache's bytes and E4M3_BYTES; the decode and prefill kernels
    then match the PyTorch path on the fp8 cache."""
    from pagedserve.kernels import triton_attention

    a100 = triton_attention.Gpu(multiprocessors=108, shared_memory=166912, native_e4m3=False)
    monkeypatch.setattr(triton_attention, "gpu", lambda device: a100)
    gen = torch.Generator().manual_seed(360)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, torch.float32, 8, 2, 64, [BLOCK + 1, 3] if with_decodes else [], PREFILLS)
    k_fp8, v_fp8 = (to_cache_format(c.nan_to_num(0.0), torch.float8_e4m3fn, 0.5)
                    for c in (key_cache, value_cache))
    out = paged_attention_triton(query, k_fp8, v_fp8, meta, 0.125, k_scale=0.5, v_scale=0.5)
    expected = paged_attention(query, k_fp8, v_fp8, meta, 0.125, k_scale=0.5, v_scale=0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# (dtype, rows' shape, hidden): a power-of-two hidden size and one that is not (masked lanes).
@pytest.mark.parametrize("dtype, lead, hidden", [
    (torch.float32, (3,), 64), (torch.float16, (2, 3), 96), (torch.float32, (1,), 200)])
def test_rms_norm_matches_torch(dtype, lead, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(*lead, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    out = rms_norm_triton(x, weight, 1e-6)
    expected = rms_norm(x, weight, 1e-6)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not out.isnan().any()
    tol = TOL[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_rms_norm_reads_a_strided_row_view():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 128, generator=gen)[:, :64]  # rows 128 apart
    weight = torch.randn(64, generator=gen)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-5), rms_norm(x, weight, 1e-5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_matches_torch(dtype):
    gen = torch.Generator().manual_seed(21 + (dtype == torch.float16))
    x = (torch.randn(5, 96, generator=gen) * 3).to(dtype)
    residual = torch.randn(5, 96, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    out, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5)
    expected, expected_residual = add_rms_norm(x, residual, weight, 1e-5)
    tol = TOL[dtype]
    torch.testing.assert_close(new_residual, expected_residual, rtol=tol, atol=tol)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


# (dtype, head_dim, rotary_dim, neox_style): full and partial rotary (GPT-NeoX's 25 %), both
# pairings, a head size that is not a power of two.
@pytest.mark.parametrize("dtype, head_dim, rotary_dim, neox", [
    (torch.float32, 64, 64, True), (torch.float16, 128, 128, False),
    (torch.float32, 80, 20, True), (torch.float32, 96, 32, False)])
def test_rotary_matches_torch(dtype, head_dim, rotary_dim, neox):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim + neox)
    x = torch.randn(7, 3, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 50, (7,), generator=gen)
    angles = torch.rand(50, rotary_dim // 2, generator=gen) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    out = apply_rotary_triton(x, positions, cos_sin, neox)
    tol = TOL[dtype]
    torch.testing.assert_close(out, apply_rotary(x, positions, cos_sin, neox), rtol=tol, atol=tol)


def test_rotary_reads_a_strided_view():
    """q as the model passes it: a view into the packed q/k/v projection output."""
    gen = torch.Generator().manual_seed(31)
    qkv = torch.randn(4, 3 * 2 * 64, generator=gen)
    q = qkv[:, :2 * 64].view(4, 2, 64)
    positions = torch.tensor([0, 5, 1, 9])
    angles = torch.rand(10, 32, generator=gen)
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    torch.testing.assert_close(apply_rotary_triton(q, positions, cos_sin),
                               apply_rotary(q, positions, cos_sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 64), (torch.float16, 1500)])
def test_silu_and_mul_matches_torch(dtype, d):
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(2, 3, 2 * d, generator=gen) * 4).to(dtype)
    out = silu_and_mul_triton(x)
    tol = TOL[dtype]
    torch.testing.assert_close(out, silu_and_mul(x), rtol=tol, atol=tol)


def test_tiles_shrink_to_fit_shared_memory():
    """sm_90: 232,448 bytes. bf16, head size 128: 128 x 128 tiles fit (163,840 bytes, what
    Triton asks there: benchmarks/compile_triton_kernels.py); float32 or head size 256 halve
    block_n, then stages, then block_m, never below min_block_m; 99 KiB GPUs (sm_86, sm_89)
    halve block_n at 128."""
    from pagedserve.kernels.triton_attention import Tiles, fit_shared_memory

    tiles = Tiles(block_m=128, block_n=128, num_warps=8, num_stages=2)
    assert fit_shared_memory(tiles, 128, 2, 232448) == tiles
    assert fit_shared_memory(tiles, 128, 4, 232448).block_n == 64
    assert fit_shared_memory(tiles, 256, 2, 232448).block_n == 64
    assert fit_shared_memory(tiles, 256, 4, 232448) == Tiles(128, 16, 8, 2)
    assert fit_shared_memory(tiles, 128, 2, 101376) == Tiles(128, 64, 8, 2)
    assert fit_shared_memory(tiles, 256, 4, 101376, min_block_m=64) == Tiles(64, 16, 8, 1)
    tiny = fit_shared_memory(tiles, 256, 4, 32 * 1024)
    assert tiny == Tiles(16, 16, 8, 1)
