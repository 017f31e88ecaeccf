"""fp8 KV caches (`--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`): what every kernel set writes
is PyTorch's own rounding of K / k_scale (saturated), and what each reads back is the cache's
values times its scale. The C kernels (decode, prefill tiles) and the Triton kernels (under the
interpreter) are checked against the PyTorch path on the same fp8 cache, and that path against
a float32 cache holding the dequantized values; then a whole engine on an fp8 cache."""

import math

import pytest
import torch

from pagedserve.kernels import cpu_kernels as cpu
from pagedserve.kernels.attention import (
    FP8_DTYPES,
    FP8_MAX,
    AttentionMetadata,
    paged_attention,
    to_cache_format,
    write_kv_cache,
)
from pagedserve.testing.paged_batches import BLOCK, build_batch, mixed_batch

FP8 = list(FP8_DTYPES.values())
needs_c = pytest.mark.skipif(not cpu.available(),
                             reason="no C compiler: the CPU kernels are not built")


def awkward_values(gen: torch.Generator) -> torch.Tensor:
    """Normal and subnormal magnitudes of both formats, values past their largest, signed
    zeros: 4 tokens x 2 KV heads x 64."""
    values = torch.cat([torch.randn(200, generator=gen) * 30,
                        torch.randn(200, generator=gen) * 1e-3,  # e4m3 subnormals
                        torch.randn(50, generator=gen) * 1e-5,  # e5m2 subnormals
                        torch.tensor([500.0, -1e6, 448.0, 57344.0, 0.0, -0.0])])
    return torch.cat([values, torch.zeros(512 - values.numel())]).view(4, 2, 64)


def test_to_cache_format_rounds_and_saturates_as_pytorch():
    x = torch.tensor([500.0, -1e6, 0.30, 3e-3])
    e4m3 = to_cache_format(x, torch.float8_e4m3fn, 0.5)
    assert e4m3.to(torch.float32).tolist() == [448.0, -448.0, 0.625, 0.005859375]
    assert to_cache_format(x, torch.float8_e5m2, 1.0).to(torch.float32)[1] == -57344.0
    assert to_cache_format(x, torch.bfloat16, 0.5) is x  # a cache of the model's dtype


@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_writer_stores_pytorchs_rounding(cache_dtype, dtype):
    gen = torch.Generator().manual_seed(3)
    key = awkward_values(gen).to(dtype)
    value = -key
    slots = torch.tensor([5, 0, 17, 9])
    expected = [to_cache_format(x, cache_dtype, s).view(torch.uint8)
                for x, s in ((key, 0.5), (value, 2.0))]
    writers = [write_kv_cache]
    if cpu.available():
        writers.append(cpu.write_kv_cache_cpu)
    for write in writers:
        caches = [torch.zeros(2, BLOCK, 2, 64, dtype=cache_dtype) for _ in range(2)]
        write(key, value, *caches, slots, k_scale=0.5, v_scale=2.0)
        for cache, want in zip(caches, expected, strict=True):
            stored = cache.view(torch.uint8).view(-1, 2, 64)
            assert torch.equal(stored[slots], want), write.__name__
            untouched = torch.ones(2 * BLOCK, dtype=torch.bool)
            untouched[slots] = False
            assert stored[untouched].eq(0).all(), write.__name__


def dequantized(cache: torch.Tensor, scale: float) -> torch.Tensor:
    return cache.to(torch.float32) * scale


@pytest.mark.parametrize("cache_dtype", FP8)
def test_the_pytorch_path_reads_the_cache_times_its_scale(cache_dtype):
    """Against float32 caches holding the dequantized values (scales folded, not applied)."""
    gen = torch.Generator().manual_seed(4)
    key_cache, value_cache, query, meta = mixed_batch(
        gen, torch.float32, 8, 2, 64, decodes=[BLOCK + 1, 3], prefills=[(0, 20), (BLOCK, 5)])
    k_fp8 = to_cache_format(key_cache.nan_to_num(0.0), cache_dtype, 0.25)
    v_fp8 = to_cache_format(value_cache.nan_to_num(0.0), cache_dtype, 4.0)
    scale = 1 / math.sqrt(64)
    out = paged_attention(query, k_fp8, v_fp8, meta, scale, None, k_scale=0.25, v_scale=4.0)
    expected = paged_attention(query, dequantized(k_fp8, 0.25), dequantized(v_fp8, 4.0), meta,
                               scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# (query dtype, heads, KV heads, head_dim, window): the default model's shape, a window with
# GQA groups of 5, head_dim 80 (no prefill tiles, not a multiple of 32), head_dim 96 (bfloat16
# decode tiles convert fp8 K rows 64 values at a time: a 64 and a 32) and 128 (two 64s).
CASES = [(torch.bfloat16, 9, 3, 64, None), (torch.float32, 10, 2, 128, 2 * BLOCK + 3),
         (torch.bfloat16, 2, 2, 80, BLOCK + 4), (torch.bfloat16, 4, 2, 96, None),
         (torch.bfloat16, 4, 1, 128, None)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def fp8_mixed_batch(case: int, cache_dtype: torch.dtype, decodes: list[int]):
    dtype, heads, kv_heads, head_dim, window = CASES[case]
    gen = torch.Generator().manual_seed(800 + case)
    prefills = [(0, 20), (BLOCK, 17), (2 * BLOCK + 3, 35), (5, 3)]
    key_cache, value_cache, query, meta = mixed_batch(gen, dtype, heads, kv_heads, head_dim,
                                                      decodes, prefills)
    k_fp8 = to_cache_format(key_cache.nan_to_num(0.0), cache_dtype, 0.5)
    v_fp8 = to_cache_format(value_cache.nan_to_num(0.0), cache_dtype, 2.0)
    return query, k_fp8, v_fp8, meta, 1 / math.sqrt(head_dim), window, dtype


@needs_c
@pytest.mark.parametrize("cache_dtype", FP8)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("with_decodes", [True, False])
def test_c_attention_on_fp8_matches_pytorch(cache_dtype, case, with_decodes):
    """Decodes and prefill chunks (by tiles where the CPU has them) on the same fp8 cache."""
    decodes = [BLOCK + 1, 1, 2 * BLOCK, 200] if with_decodes else []
    query, k_fp8, v_fp8, meta, scale, window, dtype = fp8_mixed_batch(case, cache_dtype,
                                                                      decodes)
    out = cpu.paged_attention_cpu(query, k_fp8, v_fp8, meta, scale, window, k_scale=0.5,
                                  v_scale=2.0)
    expected = paged_attention(query, k_fp8, v_fp8, meta, scale, window, k_scale=0.5,
                               v_scale=2.0)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])


@needs_c
def test_c_decode_of_many_sequences_on_fp8_matches_pytorch():
    """More than 4 sequences per thread: one task per sequence, all its KV heads."""
    gen = torch.Generator().manual_seed(9)
    seq_lens = [1, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5, 70] * 4
    key_cache, value_cache, tables, keys, values, slots = build_batch(
        gen, torch.bfloat16, 3, 64, seq_lens, num_blocks=sum(-(-n // BLOCK) for n in seq_lens)
        + 2)
    k_fp8 = torch.zeros(key_cache.shape, dtype=torch.float8_e4m3fn)
    v_fp8 = torch.zeros_like(k_fp8)
    write_kv_cache(keys, values, k_fp8, v_fp8, slots, k_scale=0.5, v_scale=0.5)
    query = torch.randn(len(seq_lens), 9, 64, generator=gen).to(torch.bfloat16)
    meta = AttentionMetadata.build(slots[:0], tables, [1] * len(seq_lens), seq_lens)
    out = cpu.paged_decode_attention_cpu(query, k_fp8, v_fp8, tables, meta.seq_lens, 0.125,
                                         k_scale=0.5, v_scale=0.5)
    expected = paged_attention(query, k_fp8, v_fp8, meta, 0.125, k_scale=0.5, v_scale=0.5)
    torch.testing.assert_close(out, expected, rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("cache_dtype", FP8)
def test_triton_attention_on_fp8_matches_pytorch(cache_dtype, monkeypatch):
    """The Triton set (under its interpreter on a CPU: float32 queries, as the interpreter
    computes bfloat16 dot products wrongly) writes and reads an fp8 cache as the PyTorch path
    does."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from pagedserve.kernels import triton_attention

    query, k_fp8, v_fp8, meta, scale, window, dtype = fp8_mixed_batch(1, cache_dtype, [3, 20])
    out = triton_attention.paged_attention_triton(query, k_fp8, v_fp8, meta, scale, window,
                                                  k_scale=0.5, v_scale=2.0)
    expected = paged_attention(query, k_fp8, v_fp8, meta, scale, window, k_scale=0.5,
                               v_scale=2.0)
    torch.testing.assert_close(out, expected, rtol=TOL[dtype], atol=TOL[dtype])
    key = awkward_values(torch.Generator().manual_seed(5))
    caches = [torch.zeros(2, BLOCK, 2, 64, dtype=cache_dtype) for _ in range(2)]
    slots = torch.tensor([3, 30, 8, 1])
    triton_attention.write_kv_cache_triton(key, key, *caches, slots, k_scale=0.5)
    assert torch.equal(caches[0].view(torch.uint8).view(-1, 2, 64)[slots],
                       to_cache_format(key, cache_dtype, 0.5).view(torch.uint8))


def test_fp8_limits_are_the_formats():
    for dtype, limit in FP8_MAX.items():
        assert torch.finfo(dtype).max == limit


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_an_engine_on_an_fp8_cache_holds_twice_the_blocks(tiny_llama_dir, kv_cache_dtype):
    """Same memory, half the bytes per block; greedy decoding runs and, on this tiny model,
    gives the bfloat16 cache's tokens (a stated tolerance, not a law: measured when written);
    the prompts again (their blocks now from the prefix cache) and two sampled sequences of
    one request sharing its prompt's blocks give the same tokens on both caches."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1.common_pb2 import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 23, 40], list(range(30, 60))]
    outputs, blocks = {}, {}
    for cache in ("auto", kv_cache_dtype):
        with LLM(str(tiny_llama_dir), dtype="bfloat16", kv_cache_dtype=cache,
                 kv_cache_gib=0.01) as llm:
            blocks[cache] = llm.pool_limits.num_blocks
            outputs[cache] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            again = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            assert again == outputs[cache]
            forked = llm.generate([prompts[1]], SamplingParams(
                max_tokens=6, temperature=0, n=2, ignore_eos=True))[0].outputs
            assert [o.token_ids for o in forked] == [outputs[cache][1][:6]] * 2
    assert blocks[kv_cache_dtype] == 2 * blocks["auto"]
    assert outputs[kv_cache_dtype] == outputs["auto"]


def with_kv_scales(source, directory, scales: dict[str, torch.Tensor]):
    """A copy of the model directory `source` whose checkpoint also holds `scales` (tensors
    named as llm-compressor names a calibrated checkpoint's KV scales)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    save_file({**tensors, **scales}, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_a_checkpoints_kv_scales_serve_an_fp8_cache(tiny_llama_dir, tmp_path):
    """`<layer>.self_attn.k_scale` / `v_scale` load into that layer's attention; an fp8 cache
    then stores PyTorch's rounding of K / k_scale and V / v_scale, and a cache of the model's
    dtype ignores them (K and V as they are)."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.executor.models import load_model
    from pagedserve.executor.models.layers import PagedAttention, bind_kv_caches, kv_cache_shape
    from pagedserve.testing.paged_run import NUM_BLOCKS, PagedRun
    from pagedserve.v1.common_pb2 import SamplingParams

    scales = {f"model.layers.{i}.self_attn.{name}": torch.tensor(value)
              for i in range(2) for name, value in (("k_scale", 0.5), ("v_scale", 0.25))}
    directory = with_kv_scales(tiny_llama_dir, tmp_path / "scaled", scales)
    model = load_model(directory, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert [(m.checkpoint_k_scale, m.checkpoint_v_scale) for m in layers] == [(0.5, 0.25)] * 2
    run = PagedRun(model)  # float32 caches: the scales unused
    assert [(m.k_scale, m.v_scale) for m in layers] == [(1.0, 1.0)] * 2
    bind_kv_caches(model, [(torch.zeros(shape, dtype=torch.float8_e4m3fn),
                            torch.zeros(shape, dtype=torch.float8_e4m3fn))
                           for shape in kv_cache_shape(model, NUM_BLOCKS, BLOCK)])
    assert [(m.k_scale, m.v_scale) for m in layers] == [(0.5, 0.25)] * 2
    written = []
    layers[0].register_forward_pre_hook(lambda _, args: written.append(args))
    run.step([([], [5, 9, 23, 40], 0)])
    (_, key, value, meta), = written
    key_cache, value_cache = layers[0].kv_cache
    slots = meta.slot_mapping
    stored = [cache.view(-1, *cache.shape[2:])[slots] for cache in (key_cache, value_cache)]
    assert torch.equal(stored[0].view(torch.uint8),
                       to_cache_format(key, torch.float8_e4m3fn, 0.5).view(torch.uint8))
    assert torch.equal(stored[1].view(torch.uint8),
                       to_cache_format(value, torch.float8_e4m3fn, 0.25).view(torch.uint8))
    # The engine on a float cache ignores the scales: it answers as the model without them.
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    answers = []
    for model_dir in (directory, tiny_llama_dir):
        with LLM(str(model_dir), dtype="float32", kv_cache_gib=0.01) as llm:
            answers.append(llm.generate([[5, 9, 23]], params)[0].outputs[0].token_ids)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("spelling, expected", [
    (("kv_scale",), (0.5, 0.5)),  # AutoFP8: one for both
    (("k_proj.output_scale", "v_proj.output_scale"), (0.5, 0.25)),  # older llm-compressor
    (("k_proj.k_scale", "v_proj.v_scale"), (0.5, 0.25)),  # ModelOpt
])
def test_older_spellings_of_the_kv_scales_load_as_vllm_reads_them(tiny_llama_dir, tmp_path,
                                                                  spelling, expected):
    from pagedserve.executor.models import load_model
    from pagedserve.executor.models.layers import PagedAttention

    scales = {f"model.layers.{i}.self_attn.{name}": torch.tensor(value)
              for i in range(2)
              for name, value in zip(spelling, (0.5, 0.25)[:len(spelling)], strict=True)}
    model = load_model(with_kv_scales(tiny_llama_dir, tmp_path / "scaled", scales),
                       torch.float32)
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert [(m.checkpoint_k_scale, m.checkpoint_v_scale) for m in layers] == [expected] * 2


@pytest.mark.parametrize("name, value, error", [
    ("model.layers.0.self_attn.k_scale", torch.tensor(-1.0), "one positive finite number"),
    ("model.layers.0.self_attn.v_scale", torch.tensor([0.5, 0.5]), "one positive finite"),
    ("model.layers.0.mlp.k_scale", torch.tensor(0.5), "not under one attention layer"),
    ("model.layers.9.self_attn.k_scale", torch.tensor(0.5), "unexpected tensor"),
    ("model.layers.0.self_attn.k_proj.output_scale", torch.tensor(0.0), "one positive finite"),
    ("model.layers.0.self_attn.q_proj.output_scale", torch.tensor(0.5), "q_proj.output_scale"),
])
def test_a_bad_kv_scale_is_refused_by_name(tiny_llama_dir, tmp_path, name, value, error):
    from pagedserve.executor.models import load_model
    from pagedserve.executor.models.weights import WeightLoadError

    directory = with_kv_scales(tiny_llama_dir, tmp_path / "bad", {name: value})
    with pytest.raises(WeightLoadError, match=error):
        load_model(directory, torch.float32)
