"""The CPU decode attention kernel (kernels/pagedserve/kernels/cpu.py, a C kernel built at first
use) against the PyTorch path, and the "cpu" kernel set through a whole model."""

import ctypes
import math
import pathlib

import pytest
import torch

from pagedserve.kernels import cpu_kernels as cpu
from pagedserve.kernels.activation import silu_and_mul
from pagedserve.kernels.attention import AttentionMetadata, paged_attention, write_kv_cache
from pagedserve.kernels.dispatch import cpu_kernels
from pagedserve.kernels.norm import add_rms_norm, rms_norm
from pagedserve.kernels.rotary import apply_rotary
from pagedserve.testing.paged_batches import BLOCK, build_batch, mixed_batch

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason="no C compiler: the CPU kernels are not built")

# bfloat16 storage, float32 arithmetic in both: they differ by the rounding of the output and
# of intermediate products.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
# (dtype, num_heads, num_kv_heads, head_dim, sliding_window)
CASES = [
    (torch.float32, 8, 2, 64, None),
    (torch.bfloat16, 9, 3, 64, None),  # the default model's attention shape
    (torch.float32, 4, 1, 128, 7),
    (torch.bfloat16, 2, 2, 80, BLOCK + 4),
    (torch.float32, 4, 4, 96, None),
    # AVX-512 BF16 dot products (head_dim a multiple of 32): a window, GQA groups of 5 (prefill
    # tiles whose query rows are not a multiple of the kernel's 8-row blocks), MQA
    (torch.bfloat16, 10, 2, 128, 2 * BLOCK + 3),
    (torch.bfloat16, 8, 1, 256, None),
]
SEQ_LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 200]


def _reference(query, key_cache, value_cache, meta, scale, window):
    # The PyTorch path gathers whole blocks and masks the scores (0 * NaN is NaN), so it reads
    # caches whose unwritten slots are zero; the C kernel reads the NaN-poisoned ones.
    return paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), meta,
                           scale, window)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_matches_torch(case):
    """Few sequences: one task per (sequence, KV head)."""
    check_decode(case, SEQ_LENS, seed=500)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_of_many_sequences_matches_torch(case):
    """More than 4 sequences per thread: one task per sequence, all its KV heads."""
    assert len(SEQ_LENS * 6) >= 4 * torch.get_num_threads()
    check_decode(case, SEQ_LENS * 6, seed=700)


def check_decode(case, seq_lens, seed):
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(seed + case)
    order = torch.randperm(len(seq_lens), generator=gen).tolist()
    seq_lens = [seq_lens[i] for i in order]
    num_blocks = sum(-(-n // BLOCK) for n in seq_lens) + 2
    key_cache, value_cache, tables, keys, values, slots = build_batch(
        gen, dtype, num_kv_heads, head_dim, seq_lens, num_blocks=num_blocks)
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = keys
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = values
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata.build(slots[:0], tables, [1] * len(seq_lens), seq_lens)
    scale = 1 / math.sqrt(head_dim)

    out = torch.full_like(query, float("nan"))
    cpu.paged_decode_attention_cpu(query, key_cache, value_cache, tables,
                                             meta.seq_lens, scale, window, out=out)
    expected = _reference(query, key_cache, value_cache, meta, scale, window)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 64, 300])  # 300: the OpenMP-parallel copy
def test_kv_cache_write_matches_torch(dtype, tokens):
    """K and V as the q/k/v split leaves them (strided views), into scattered slots."""
    gen = torch.Generator().manual_seed(tokens)
    heads, kv_heads, dim, blocks = 4, 2, 64, 40
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    _, key, value = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    key, value = key.view(tokens, kv_heads, dim), value.view(tokens, kv_heads, dim)
    slots = torch.randperm(blocks * BLOCK, generator=gen)[:tokens]
    caches = [torch.full((blocks, BLOCK, kv_heads, dim), float("nan"), dtype=dtype)
              for _ in range(4)]
    cpu.write_kv_cache_cpu(key, value, caches[0], caches[1], slots)
    write_kv_cache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))


@pytest.mark.parametrize("writer", [cpu.write_kv_cache_cpu, write_kv_cache],
                         ids=["cpu", "torch"])
def test_kv_cache_write_skips_padding_slots(writer):
    """A negative slot (a padded CUDA-graph batch's rows) stores nothing; the others land as
    they would without it."""
    gen = torch.Generator().manual_seed(5)
    key, value = (torch.randn(4, 2, 64, generator=gen) for _ in range(2))
    slots = torch.tensor([9, -1, 0, -1])
    caches = [torch.full((4, BLOCK, 2, 64), float("nan")) for _ in range(2)]
    writer(key, value, *caches, slots)
    for cache, new in zip(caches, (key, value), strict=True):
        rows = cache.view(-1, 2, 64)
        assert torch.equal(rows[[9, 0]], new[[0, 2]])
        assert rows.isnan().all(-1).all(-1).sum() == rows.shape[0] - 2  # nothing else written


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_decodes", [True, False])
def test_mixed_batch_matches_torch(case, with_decodes):
    """Decodes and prefill chunks in one batch. On AVX-512 CPUs with head_dim a multiple of 32,
    the prefills go by tiles of 16 tokens (chunks shorter than a tile, one tile and a tail,
    several tiles; with and without a cached prefix, windows that cut into a tile); else token
    by token."""
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(600 + case)
    decodes = [BLOCK + 1, 1, 2 * BLOCK] if with_decodes else []
    prefills = [(0, 20), (BLOCK, 17), (2 * BLOCK + 3, 35), (5, 3), (0, 1), (40, 48)]
    key_cache, value_cache, query, meta = mixed_batch(gen, dtype, num_heads, num_kv_heads,
                                                      head_dim, decodes, prefills)
    scale = 1 / math.sqrt(head_dim)
    out = cpu.paged_attention_cpu(query, key_cache, value_cache, meta, scale, window)
    expected = _reference(query, key_cache, value_cache, meta, scale, window)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("case", [1, 5])  # the default model's shape; groups of 5 and a window
def test_bfloat16_error_stays_within_twice_the_rounding_of_the_exact_result(case):
    """Against float64 on the same bfloat16 inputs, decodes and prefills: the kernels round the
    attention weights to bfloat16 for P.V (as flash attention does), and their error stays
    within twice that of rounding the exact result to bfloat16, mean and max."""
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(670 + case)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, dtype, num_heads, num_kv_heads, head_dim, [120, BLOCK + 1, 37],
        [(0, 150), (40, 60)])
    scale = 1 / math.sqrt(head_dim)
    out = cpu.paged_attention_cpu(query, key_cache, value_cache, meta, scale, window).double()
    exact = paged_attention(query.double(), key_cache.nan_to_num(0.0).double(),
                            value_cache.nan_to_num(0.0).double(), meta, scale, window)
    error, rounding = (out - exact).abs(), (exact.to(dtype).double() - exact).abs()
    assert error.mean() <= 2 * rounding.mean()
    assert error.max() <= 2 * rounding.max()


@pytest.mark.parametrize("case", [0, 3, 5])  # float32; bfloat16; bfloat16 dot-product tiles
def test_soft_capped_scores_match_torch(case):
    """Gemma 2's cap (0.5: it changes every score) on decodes and prefills, windows included;
    the capped output differs from the uncapped one."""
    dtype, num_heads, num_kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(650 + case)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, dtype, num_heads, num_kv_heads, head_dim, [BLOCK + 1, 1, 2 * BLOCK],
        [(0, 20), (2 * BLOCK + 3, 35), (40, 48)])
    scale = 1 / math.sqrt(head_dim)
    out = cpu.paged_attention_cpu(query, key_cache, value_cache, meta, scale, window,
                                  softcap=0.5)
    expected = paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0),
                               meta, scale, window, softcap=0.5)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])
    uncapped = _reference(query, key_cache, value_cache, meta, scale, window)
    assert (out.float() - uncapped.float()).abs().max() > 10 * TOL[dtype]


def test_prefill_tiles_run_wherever_the_cpu_has_avx512():
    """So that the mixed-batch tests above check the tiles on such a CPU, not only the
    token-by-token path the kernel falls back to elsewhere."""
    flags = next(line for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split()
    assert cpu.prefill_tiles_supported(64) == ("avx512f" in flags)
    assert not cpu.prefill_tiles_supported(80)


def test_prefill_tiles_cover_every_prefill_token_once():
    meta = AttentionMetadata.build(torch.zeros(0, dtype=torch.long), torch.zeros(4, 8),
                                   [1, 1, 40, 5], [30, 7, 50, 5])
    assert meta.prefill_tiles.tolist() == [
        [2, 2, 16, 11], [2, 18, 16, 27], [2, 34, 8, 43], [3, 42, 5, 1]]


def test_the_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu._loaded_library.cache_clear()
    try:
        assert cpu.available()
        built = list((tmp_path / "pagedserve" / "kernels").glob("cpu_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu._loaded_library.cache_clear()
        assert cpu.available() and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu._loaded_library.cache_clear()


def test_the_ctypes_mirror_matches_the_c_struct():
    size, fields = cpu._c_layout(cpu._loaded_library(), "decode_shape_layout")
    assert [name for name, *_ in fields] == [name for name, _ in cpu._DecodeShape._fields_]
    cpu.check_layout("DecodeShape", cpu._DecodeShape, size, fields)


def _drifted(fields):
    return type("_DecodeShape", (ctypes.Structure,), {"_fields_": fields})


SHAPE_FIELDS = cpu._DecodeShape._fields_


@pytest.mark.parametrize("fields, error", [
    # a changed type that padding hides from every offset: only the field sizes tell
    ([("num_seqs", ctypes.c_int32), *SHAPE_FIELDS[1:]],
     "field 'num_seqs' is 8 bytes at offset 0 in C, 4 bytes at offset 0 in the mirror"),
    ([*SHAPE_FIELDS[:-1], ("softcap", ctypes.c_double)],
     "field 'softcap' is 4 bytes at offset 140"),
    # two fields of one type swapped: no offset moves, the names tell
    ([SHAPE_FIELDS[1], SHAPE_FIELDS[0], *SHAPE_FIELDS[2:]],
     "field 'num_seqs' is 8 bytes at offset 0 in C, 8 bytes at offset 8 in the mirror"),
    ([("n_seqs", ctypes.c_int64), *SHAPE_FIELDS[1:]], "field 'num_seqs' is not in the mirror"),
    (SHAPE_FIELDS[:-1], "20 fields in C, 19 in the mirror"),
])
def test_a_drifted_mirror_fails_naming_the_struct_and_field(fields, error):
    size, c_fields = cpu._c_layout(cpu._loaded_library(), "decode_shape_layout")
    with pytest.raises(RuntimeError, match="the C struct DecodeShape and its ctypes mirror "
                                           "_DecodeShape .* disagree: " + error):
        cpu.check_layout("DecodeShape", _drifted(fields), size, c_fields)


def test_a_mirror_of_the_wrong_size_fails():
    """Every field agrees, the tail padding does not (as a C struct ending in a 4-byte field
    after 8-byte ones pads where a mirror packed to 4 does not)."""
    size, fields = cpu._c_layout(cpu._loaded_library(), "decode_shape_layout")
    assert size == ctypes.sizeof(cpu._DecodeShape) == 144
    with pytest.raises(RuntimeError, match="sizeof is 152 in C, 144 in the mirror"):
        cpu.check_layout("DecodeShape", cpu._DecodeShape, size + 8, fields)


def test_a_drifted_mirror_fails_the_load(monkeypatch):
    monkeypatch.setattr(cpu, "_DecodeShape",
                        _drifted([("num_seqs", ctypes.c_int32), *SHAPE_FIELDS[1:]]))
    cpu._loaded_library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="DecodeShape .* field 'num_seqs'"):
            cpu.available()
    finally:
        cpu._loaded_library.cache_clear()


def test_no_compiler_falls_back_with_a_clear_error(tmp_path, monkeypatch):
    from pagedserve.kernels.dispatch import KernelBackendError, select_kernels

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu._loaded_library.cache_clear()
    try:
        assert not cpu.available()
        assert select_kernels("auto", torch.device("cpu")).name == "torch"
        with pytest.raises(KernelBackendError, match="could not be built"):
            select_kernels("cpu", torch.device("cpu"))
    finally:
        cpu._loaded_library.cache_clear()


def test_the_cpu_set_is_auto_on_cpu():
    from pagedserve.kernels.dispatch import select_kernels

    assert select_kernels("auto", torch.device("cpu")).name == "cpu"
    assert cpu_kernels().paged_attention is cpu.paged_attention_cpu


# Two roundings apart at most: the PyTorch path rounds some intermediate products to bfloat16
# where the C kernels keep float32.
LAYER_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# Sizes of 16s (the bfloat16 vector paths) and not.
@pytest.mark.parametrize("hidden", [576, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_torch(dtype, hidden):
    gen = torch.Generator().manual_seed(800)
    x = (torch.randn(7, 3, hidden, generator=gen) * 3).to(dtype)
    residual = torch.randn(7, 3, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    tol = LAYER_TOL[dtype]
    torch.testing.assert_close(cpu.rms_norm_cpu(x, weight, 1e-5), rms_norm(x, weight, 1e-5),
                               rtol=tol, atol=tol)
    out, new_residual = cpu.add_rms_norm_cpu(x, residual, weight, 1e-5)
    ref_out, ref_residual = add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    # Against float64 on the stored sum: within two bfloat16 roundings (2^-8 each) of each
    # output (or float32's precision).
    summed = new_residual.double()
    exact = weight.double() * summed * (summed.square().mean(-1, keepdim=True) + 1e-5).rsqrt()
    bound = (2 * 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6) * exact.abs() + 1e-6
    assert bool(((out.double() - exact).abs() <= bound).all())
    strided = torch.randn(4, 2 * hidden, generator=gen).to(dtype)[:, :hidden]  # rows apart
    torch.testing.assert_close(cpu.rms_norm_cpu(strided, weight, 1e-5),
                               rms_norm(strided, weight, 1e-5), rtol=tol, atol=tol)


@pytest.mark.parametrize("d", [1536, 1541])  # 16s (the bfloat16 vector path), and a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype, d):
    gen = torch.Generator().manual_seed(801)
    x = (torch.randn(5, 2 * d, generator=gen) * 6).to(dtype)  # gates far into both tails
    tol = LAYER_TOL[dtype]
    torch.testing.assert_close(cpu.silu_and_mul_cpu(x), silu_and_mul(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, head_dim, rotary_dim, neox", [
    (torch.float32, 64, 64, True), (torch.bfloat16, 64, 64, True),
    (torch.float32, 128, 128, False), (torch.float32, 80, 20, True)])
def test_rotary_matches_torch(dtype, head_dim, rotary_dim, neox):
    gen = torch.Generator().manual_seed(802 + head_dim)
    qkv = torch.randn(6, 3 * 4 * head_dim, generator=gen).to(dtype)
    q = qkv[:, :4 * head_dim].view(6, 4, head_dim)  # a view into q/k/v, as the models pass it
    positions = torch.randint(0, 100, (6,), generator=gen)
    angles = torch.rand(100, rotary_dim // 2, generator=gen) * 6
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)
    tol = LAYER_TOL[dtype]
    torch.testing.assert_close(cpu.apply_rotary_cpu(q, positions, cos_sin, neox),
                               apply_rotary(q, positions, cos_sin, neox), rtol=tol, atol=tol)


@pytest.mark.skipif(not cpu.bf16_linear_supported(),
                    reason="no AVX-512 BF16: oneDNN serves bfloat16 linears")
@pytest.mark.parametrize(("m", "n", "k", "bias", "pad"), [
    (1, 16, 32, False, 0),      # one row, one block
    (7, 100, 98, True, 0),      # rows past a pass of 6, channels past a block, pairs not 16s
    (13, 576, 576, True, 8),    # the default model's o_proj, rows of a wider tensor
    (64, 960, 576, False, 0),   # its qkv_proj at a decode batch of 64
    (6, 48, 64, True, 0),       # one pass, three blocks
    (200, 1536, 576, False, 0),  # a prefill chunk through gate_up's half
])
def test_bf16_linear_matches_float64(m, n, k, bias, pad):
    """bf16_linear.c against float64 on the same bfloat16 inputs: within twice bfloat16's
    rounding of the exact result (products exact, float32 sums)."""
    gen = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    x = torch.randn(m, k + pad, generator=gen).bfloat16()[:, :k]
    packed = cpu.pack_linear_cpu(weight)
    out = cpu.packed_linear_cpu(x, packed, b).double()
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    error, rounding = (out - exact).abs(), (exact.bfloat16().double() - exact).abs()
    assert error.max() <= 2 * rounding.max() and error.mean() <= 2 * rounding.mean()


@pytest.mark.parametrize(("pack", "weights"), [
    (cpu._pack_bf16, "bfloat16"), (cpu._pack_float, "bfloat16"),
    (cpu._pack_float, "float32"), (cpu._pack_float, "bf16-exact float32")])
@pytest.mark.parametrize("n", [16, 33, 100])
def test_packed_float_layouts_give_back_the_weight(pack, weights, n):
    """Our packed float layouts (bf16_linear.c's, float_linear's, the latter in bfloat16 where
    exact), on any CPU: the plain weight back exactly, and rows read in the packed layout (a
    tied embedding's lookups, in the embedding's dtype) equal the weight's rows."""
    weight = torch.randn(n, 24, generator=torch.Generator().manual_seed(n))
    if weights != "float32":
        weight = weight.bfloat16()
    dtype = torch.float32 if weights.endswith("float32") else torch.bfloat16
    weight = weight.to(dtype)
    packed = pack(weight)
    dense = packed.to_dense()
    assert dense.dtype == dtype and torch.equal(dense, weight)
    ids = torch.tensor([n - 1, 0, n // 2, 15, 0])
    assert torch.equal(packed.rows(ids, torch.float32), weight[ids].float())
    assert torch.equal(packed.rows(ids, dtype), weight[ids])


@pytest.mark.skipif(not cpu.bf16_linear_supported(),
                    reason="no AVX-512 BF16: oneDNN serves bfloat16 linears")
def test_bf16_linear_of_no_rows_is_empty():
    """A step can hand a layer no rows (the LM head of a step that samples nothing)."""
    packed = cpu.pack_linear_cpu(torch.ones(64, 32, dtype=torch.bfloat16))
    out = cpu.packed_linear_cpu(torch.empty(0, 32, dtype=torch.bfloat16), packed, None)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


@pytest.mark.skipif(not cpu.float_linear_supported(),
                    reason="AVX-512 CPU: float32 linears go to MKL, bfloat16 to bf16_linear.c")
@pytest.mark.parametrize("weights", ["float32", "bf16-exact float32", "bfloat16"])
@pytest.mark.parametrize(("m", "n", "k", "bias", "pad"), [
    (1, 16, 8, False, 0),       # one row, one block, one step of 8 k
    (3, 100, 96, True, 0),      # streamed rows, channels past a block
    (4, 576, 1536, True, 8),    # the most rows streamed; the default model's down_proj
    (5, 33, 64, False, 0),      # the fewest rows by tiles, a block of one channel
    (13, 960, 576, True, 8),    # tiles of 6 and a tile of 1, rows of a wider tensor
])
def test_float_linear_matches_float64(weights, m, n, k, bias, pad):
    """float_linear (CPUs without AVX-512) against float64 on the same inputs: float32 sums
    within 8 float32 ulps of sum |x w| (partial sums in a few accumulators: up to 2.2 seen
    here, PyTorch's matmul up to 1; k ulps is the worst case); bfloat16 outputs within twice
    bfloat16's rounding of the exact result. A float32 weight is stored in bfloat16 exactly
    when every value is one, and packing round-trips in the weight's dtype."""
    gen = torch.Generator().manual_seed(m * n + k)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    weight = torch.randn(n, k, generator=gen)
    if weights != "float32":
        weight = weight.bfloat16().float()
    weight = weight.to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(m, k + pad, generator=gen).to(dtype)[:, :k]
    packed = cpu.pack_linear_cpu(weight)
    assert packed.data.dtype == (torch.float32 if weights == "float32" else torch.bfloat16)
    dense = packed.to_dense()
    assert dense.dtype == dtype and torch.equal(dense, weight)
    out = cpu.packed_linear_cpu(x, packed, b)
    assert out.dtype == dtype and out.shape == (m, n)
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    error = (out.double() - exact).abs()
    if dtype == torch.bfloat16:
        rounding = (exact.bfloat16().double() - exact).abs()
        assert error.max() <= 2 * rounding.max() and error.mean() <= 2 * rounding.mean()
    else:
        magnitude = x.double().abs() @ weight.double().abs().T + (b.double().abs() if bias else 0)
        assert (error <= 8 * torch.finfo(torch.float32).eps * magnitude).all()


@pytest.mark.skipif(not cpu.float_linear_supported(),
                    reason="AVX-512 CPU: float32 linears go to MKL, bfloat16 to bf16_linear.c")
def test_float_linear_takes_what_it_can():
    """An input width not a multiple of 8 stays with PyTorch's matmul (None); a step can hand
    a layer no rows (the LM head of a step that samples nothing)."""
    assert cpu.pack_linear_cpu(torch.ones(16, 12)) is None
    packed = cpu.pack_linear_cpu(torch.ones(64, 32))
    out = cpu.packed_linear_cpu(torch.empty(0, 32), packed, None)
    assert out.shape == (0, 64) and out.dtype == torch.float32


def _logits(model, prompts, dtype):
    from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
    from pagedserve.executor.models.layers import bind_kv_caches, kv_cache_shape

    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for shape in kv_cache_shape(model, 64, BLOCK)]
    bind_kv_caches(model, caches)
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(len(prompts))]
    batch = build_flat_batch([ScheduledSequence(p, 0, t) for p, t in zip(prompts, tables,
                                                                        strict=True)], BLOCK)
    with torch.inference_mode():
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        return model.compute_logits(hidden[batch.last_token_rows])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_a_model_on_the_cpu_set_packs_its_linears(tiny_llama_dir, dtype, tolerance):
    """Every Linear's weight is repacked (bfloat16: for bf16_linear.c or oneDNN on AVX-512
    CPUs; either dtype for float_linear on CPUs without AVX-512, in bfloat16 where exact) and
    its plain copy released; the embedding tied to the LM head then reads its rows from the
    head's packed form, so the weights are held once (oneDNN's form gives no rows: the plain
    copy stays for the embedding). The logits match the PyTorch path's; binding the PyTorch
    set again restores the plain weights exactly. A float32 model on an AVX-512 CPU packs
    nothing (MKL's matmul on the plain weights), nor does a bfloat16 one on an AVX-512 CPU
    where oneDNN has no bf16 path."""
    from pagedserve.executor.models import load_model
    from pagedserve.executor.models.layers import Linear, bind_kernels, weight_bytes
    from pagedserve.kernels.dispatch import TORCH_KERNELS

    model = load_model(tiny_llama_dir, dtype)
    embedding = model.model.embed_tokens
    plain = {name: p.clone() for name, p in model.named_parameters()}
    prompts = [[5, 6, 7, 8, 9], list(range(20, 60))]
    expected = _logits(model, prompts, dtype)
    bind_kernels(model, cpu_kernels())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    ours = cpu.float_linear_supported() or dtype == torch.bfloat16 and cpu.bf16_linear_supported()
    if ours or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert all(m.packed is not None for m in linears.values())
        kept = set() if ours else {"lm_head"}
        assert all(m.weight.numel() == 0 for name, m in linears.items() if name not in kept)
        assert embedding.tied_head is (linears["lm_head"] if ours else None)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weight_bytes(model) == params + sum(m.packed.nbytes for m in linears.values())
    else:
        assert all(m.packed is None and m.weight.numel() > 0 for m in linears.values())
    torch.testing.assert_close(_logits(model, prompts, dtype), expected,
                               rtol=tolerance, atol=tolerance)
    bind_kernels(model, TORCH_KERNELS)
    assert all(m.packed is None and m.weight.numel() > 0 for m in linears.values())
    assert embedding.tied_head is None
    assert all(torch.equal(p, plain[name]) for name, p in model.named_parameters())
    torch.testing.assert_close(_logits(model, prompts, dtype), expected, rtol=0, atol=0)
