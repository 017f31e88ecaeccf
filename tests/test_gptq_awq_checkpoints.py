"""GPTQ and AWQ checkpoints as the Hub ships them, made by auto-round's own exporters from tiny
transformers models of every family (pagedserve/testing/gptq_awq_files.py), loaded as grouped
int weights and checked against transformers running the weights auto-round's own unpackers
make of the same files; and what is not supported, refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.executor.models import UnsupportedArchitectureError, load_model
from pagedserve.executor.models.layers import Linear, RowParallelLinear, bind_kernels, weight_bytes
from pagedserve.executor.parallel import TensorParallel
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import select_kernels
from pagedserve.kernels.quantization import GroupedWeight, Int8Weight
from pagedserve.testing.gptq_awq_files import (
    reference_model,
    reorder_gptq_columns,
    save_gptq_awq,
)
from pagedserve.testing.paged_run import assert_matches_transformers
from pagedserve.testing.tiny_models import (
    save_tiny_model,
    tiny_gpt_neox_config,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_qwen2_config,
)

VOCAB = 300
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52))]
FAMILIES = {
    "llama": lambda: tiny_llama_config(VOCAB),
    "mistral": lambda: tiny_mistral_config(VOCAB),
    "qwen2": lambda: tiny_qwen2_config(VOCAB),  # q/k/v biases
    "gpt-neox": lambda: tiny_gpt_neox_config(VOCAB),  # fused q/k/v, split per head
}
# Not Falcon: auto-round 0.16's exporters leave its decoder layers float, so no writer here
# makes a Falcon GPTQ or AWQ checkpoint (its fused q/k/v loads through the code GPT-NeoX's
# takes, with per-group-of-heads splitting tested on int8 in tests/test_quantization.py).
# (method, symmetric, group size, bits): every family under each method; groups of 32
# columns (the tiny models are 64 wide), or one per row.
CHECKPOINTS = {
    "gptq-asym": ("gptq", False, 32, 4),
    "gptq-sym": ("gptq", True, 32, 4),
    "awq": ("awq", False, 32, 4),
    "gptq-8bit-channel": ("gptq", True, -1, 8),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(family, name):
        if (family, name) not in cache:
            source = save_tiny_model(tmp_path_factory.mktemp(f"{family}-float"),
                                     FAMILIES[family]())
            method, symmetric, group_size, bits = CHECKPOINTS[name]
            cache[family, name] = save_gptq_awq(
                source, method, tmp_path_factory.mktemp(f"{family}-{name}"),
                symmetric=symmetric, group_size=group_size, bits=bits)
        return cache[family, name]
    return get


def loaded(directory, kernel_set: str = "torch"):
    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    model = load_model(directory, torch.float32)
    bind_kernels(model, select_kernels(kernel_set, torch.device("cpu")))
    return model


CASES = [("llama", "gptq-asym"), ("llama", "awq"),
         pytest.param("mistral", "gptq-sym", marks=pytest.mark.slow),
         pytest.param("qwen2", "awq", marks=pytest.mark.slow),
         pytest.param("gpt-neox", "gptq-asym", marks=pytest.mark.slow),
         pytest.param("gpt-neox", "awq", marks=pytest.mark.slow),
         pytest.param("qwen2", "gptq-8bit-channel", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kernel_set", ["cpu", "torch"])
@pytest.mark.parametrize("family, name", CASES)
def test_a_gptq_or_awq_checkpoint_matches_its_dequantized_weights(checkpoint, family, name,
                                                                  kernel_set):
    directory = checkpoint(family, name)
    method, _, group_size, bits = CHECKPOINTS[name]
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == method
    model = loaded(directory, kernel_set)
    assert model.quantization == method
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear)}
    head = linears.pop("embed_out" if family == "gpt-neox" else "lm_head", None)
    # auto-round leaves the head float; every projection is quantized, its float released.
    assert head is None or head.quantized is None
    assert linears and all(m.quantized is not None and m.weight.numel() == 0
                           for m in linears.values())
    plain = {type(m.quantized.plain() if kernel_set == "cpu" else m.quantized)
             for m in linears.values()}
    assert plain == {Int8Weight if group_size == -1 else GroupedWeight}
    assert_matches_transformers(model, reference_model(directory), PROMPTS, chunk=5,
                                decode_steps=3, tol=1e-4)


@pytest.mark.slow
def test_the_triton_kernels_run_a_gptq_checkpoint(checkpoint):
    directory = checkpoint("llama", "gptq-asym")
    assert_matches_transformers(loaded(directory, "triton"), reference_model(directory),
                                PROMPTS[:2], chunk=5, decode_steps=2, tol=1e-4)


@pytest.mark.parametrize("kernel_set", ["cpu", "triton"])
def test_4bit_weights_take_half_a_byte_each(checkpoint, kernel_set):
    """Where the C kernels or the Triton kernel (what a GPU runs) multiply them."""
    directory = checkpoint("llama", "awq")
    model = loaded(directory, kernel_set)
    values = sum(m.quantized.plain().qweight.numel() for m in model.modules()
                 if isinstance(m, Linear) and m.quantized is not None)
    floats = sum(p.numel() * 4 for p in model.parameters())
    # Float layers the kernel set packed (a tied head, for float_linear on CPUs without
    # AVX-512) hold their weight in that form only.
    floats += sum(m.packed.nbytes for m in model.modules()
                  if isinstance(m, Linear) and m.packed is not None)
    # Half a byte per value, plus float16 scale and offset per group of 32 (a byte per 8
    # values) when they are exact in float16, float32 otherwise (two bytes per 8).
    assert floats + values * 0.5 < weight_bytes(model) <= floats + values * (0.5 + 0.25)


def test_a_packed_model_moves_packed(checkpoint):
    """The executor packs on the host and then moves the model (bootstrap), so a move keeps
    each weight's packed form and dtypes (it unpacked them to a byte a value before)."""
    from pagedserve.kernels.triton_quantization import NarrowWeight

    model = loaded(checkpoint("llama", "awq"), "triton")
    before = {name: m.quantized for name, m in model.named_modules()
              if isinstance(m, Linear) and m.quantized is not None}
    model.to("meta")
    for name, m in model.named_modules():
        if name in before:
            assert isinstance(m.quantized, NarrowWeight) and m.quantized.low.is_meta
            assert [t.dtype for t in (m.quantized.low, m.quantized.scales)] == \
                [t.dtype for t in (before[name].low, before[name].scales)]


def test_gptq_v2_stores_the_zero_points_gptq_stores_less_one(checkpoint, tmp_path):
    """GPTQModel's `gptq_v2` format: the same checkpoint with its zero points repacked one
    higher loads the same weights."""
    directory = checkpoint("llama", "gptq-asym")
    v2 = _copy(directory, tmp_path / "v2", checkpoint_format="gptq_v2")
    tensors = load_file(directory / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        words = tensors[name]
        nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=-1)
        nibbles = nibbles + 1  # auto-round's RTN zero points stay below 15
        assert int(nibbles.max()) <= 15
        tensors[name] = sum(nibbles[..., i] << (4 * i) for i in range(8)).to(torch.int32)
    save_file(tensors, v2 / "model.safetensors")
    ours, theirs = load_model(v2, torch.float32), load_model(directory, torch.float32)
    for (name, a), b in zip(ours.named_modules(), theirs.modules(), strict=True):
        if isinstance(a, Linear) and a.quantized is not None:
            assert torch.equal(a.quantized.dequantized(torch.float32),
                               b.quantized.dequantized(torch.float32)), name


def _copy(directory, target, **quantization):
    """The checkpoint in `directory` copied to `target`, its quantization_config updated."""
    import shutil

    shutil.copytree(directory, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("update, field", [
    ({"bits": 3}, "quantization_config.bits 3"),
    ({"checkpoint_format": "marlin"}, "quantization_config.checkpoint_format 'marlin'"),
    ({"dynamic": {"+:.*down.*": {"bits": 8}}}, "quantization_config.dynamic"),
    ({"group_size": 0}, "quantization_config.group_size 0"),
])
def test_gptq_variants_not_supported_are_refused_by_field(checkpoint, tmp_path, update, field):
    directory = _copy(checkpoint("llama", "gptq-asym"), tmp_path / "copy", **update)
    with pytest.raises(UnsupportedArchitectureError, match=f"{field}.* is not supported"):
        load_model(directory, torch.float32)


@pytest.mark.parametrize("update, field", [
    ({"version": "gemv"}, "quantization_config.version 'gemv'"),
    ({"bits": 8}, "quantization_config.bits 8"),
    ({"zero_point": False}, "quantization_config.zero_point false"),
])
def test_awq_variants_not_supported_are_refused_by_field(checkpoint, tmp_path, update, field):
    directory = _copy(checkpoint("llama", "awq"), tmp_path / "copy", **update)
    with pytest.raises(UnsupportedArchitectureError, match=f"{field}.* is not supported"):
        load_model(directory, torch.float32)


def _act_order(checkpoint, directory, *, mlp_order=None, kv_head_order=(1, 0)):
    """The llama GPTQ checkpoint with its intermediate features (128, four groups of 32 in
    down; at random by default) and its two KV heads (the halves of o's 64 columns, a group of
    32 each) renumbered, so that o's and down's groups come out of order: the same model."""
    if mlp_order is None:
        mlp_order = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    return reorder_gptq_columns(checkpoint("llama", "gptq-asym"), directory, mlp_order=mlp_order,
                                kv_head_order=torch.tensor(kv_head_order))


@pytest.mark.parametrize("kernel_set", ["cpu", "torch"])
def test_an_act_order_checkpoint_matches_its_dequantized_weights(checkpoint, tmp_path,
                                                                 kernel_set):
    """o's and down's columns sorted by group at load, their inputs gathered in that order:
    the model computes what transformers computes with the weights auto-round unpacks."""
    directory = _act_order(checkpoint, tmp_path / "act-order")
    model = loaded(directory, kernel_set)
    layer = model.model.layers[1]
    assert layer.self_attn.qkv_proj.input_order is None
    assert layer.mlp.gate_up_proj.input_order is None
    for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
        order = linear.input_order
        assert order is not None and not torch.equal(order, torch.arange(len(order)))
        assert linear.quantized.plain().qweight.shape[1] == len(order)
    assert_matches_transformers(model, reference_model(directory), PROMPTS, chunk=5,
                                decode_steps=3, tol=1e-4)


def _edit(directory, name, edit):
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, directory / "model.safetensors")


def test_groups_out_of_order_without_desc_act_are_refused_naming_the_tensor(checkpoint,
                                                                           tmp_path):
    directory = _copy(checkpoint("llama", "gptq-asym"), tmp_path / "copy", desc_act=False)
    name = "model.layers.1.mlp.down_proj.g_idx"
    _edit(directory, name, lambda g: g.flip(0))
    with pytest.raises(UnsupportedArchitectureError,
                       match=f"{name}: input columns in groups out of order, where "
                             "quantization_config.desc_act is false"):
        load_model(directory, torch.float32)


@pytest.mark.parametrize("tensor, edit, message", [
    # A group of 33 columns and one of 31.
    ("model.layers.0.mlp.down_proj.g_idx", lambda g: torch.cat([g[:-1], g[-1:] * 0]),
     "model.layers.0.mlp.down_proj.g_idx: groups of other sizes than group_size 32"),
    # k's columns in another order than q's and v's, which share its input.
    ("model.layers.0.self_attn.k_proj.g_idx", lambda g: g.flip(0),
     r"model.layers.0.self_attn.[qkv]_proj.\w+: part \d.* act-order"),
])
def test_act_order_groups_that_cannot_be_served_are_refused_naming_the_tensor(
        checkpoint, tmp_path, tensor, edit, message):
    directory = _copy(checkpoint("llama", "gptq-asym"), tmp_path / "copy", desc_act=True)
    _edit(directory, tensor, edit)
    with pytest.raises(ValueError, match=message):
        load_model(directory, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True])
def test_two_ranks_serve_act_order_as_one_does(checkpoint, tmp_path, across):
    """Down's renumbered columns within their rank's half, o's in order (each rank reads its
    own input slice), or renumbered at random across the halves, o's KV heads swapped (each
    rank gathers the whole input first): two ranks score the prompts as one does."""
    if across:
        directory = _act_order(checkpoint, tmp_path / "across")
    else:
        halves = torch.cat([torch.randperm(64, generator=torch.Generator().manual_seed(1))
                            + half for half in (0, 64)])
        directory = _act_order(checkpoint, tmp_path / "halves", mlp_order=halves,
                               kv_head_order=(0, 1))
    single, split = _prompt_logprobs_on_one_and_two_ranks(directory)
    assert len(split) == sum(len(p) - 1 for p in PROMPTS[1:])
    assert split == pytest.approx(single, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_gathers_the_input_only_where_act_order_groups_span_ranks(rank):
    """The order a row-parallel rank applies: its own slice's columns, renumbered from 0,
    where every rank's stored columns come from its own input slice; else the whole input's
    columns, gathered first (decided from the whole order, alike on every rank)."""
    tp = TensorParallel(rank=rank, size=2)
    within = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    layer = RowParallelLinear(8, [4], False, torch.float32, tp)
    assert torch.equal(layer.local_input_order(within), within[4 * rank:4 * rank + 4] - 4 * rank)
    assert not layer.gathers_input
    across = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # rank 1's columns in both slices
    layer = RowParallelLinear(8, [4], False, torch.float32, tp)
    assert torch.equal(layer.local_input_order(across), across[4 * rank:4 * rank + 4])
    assert layer.gathers_input


def _prompt_logprobs_on_one_and_two_ranks(directory) -> list[list[float]]:
    """The prompts' logprobs as one rank scores them, and as two do."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1 import common_pb2

    runs = []
    for size in (1, 2):
        with LLM(str(directory), tensor_parallel_size=size, dtype="float32", kv_cache_gib=0.01,
                 max_model_len=128) as llm:
            outputs = llm.generate(PROMPTS[1:], common_pb2.SamplingParams(
                max_tokens=1, temperature=0, prompt_logprobs=1))
            runs.append([lp.chosen.logprob for o in outputs for lp in o.prompt_logprobs[1:]])
    return runs


def test_a_truncated_qweight_is_refused_naming_the_module(checkpoint, tmp_path):
    directory = _copy(checkpoint("llama", "awq"), tmp_path / "bad")
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.qweight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: qweight unpacks to"):
        load_model(directory, torch.float32)


@pytest.mark.slow
def test_two_ranks_serve_a_gptq_checkpoint_as_one_does(checkpoint):
    """Each rank takes its slice of the values, scales and zero points (groups of 32 divide
    every rank's columns): two ranks score the prompts as one does, to float rounding."""
    directory = checkpoint("llama", "gptq-asym")
    single, split = _prompt_logprobs_on_one_and_two_ranks(directory)
    assert len(split) == sum(len(p) - 1 for p in PROMPTS[1:])
    assert split == pytest.approx(single, rel=1e-4, abs=1e-5)


def test_the_quantization_flag_may_name_the_checkpoints_method(checkpoint, tmp_path):
    """vLLM's `--quantization awq` / `gptq`: accepted on a checkpoint of that method, refused
    naming what the model is on any other."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError
    from pagedserve.testing.tiny_models import save_tiny_llama
    from pagedserve.v1 import common_pb2

    engine = dict(dtype="float32", kv_cache_gib=0.01, max_model_len=64)
    with LLM(str(checkpoint("llama", "awq")), quantization="awq", **engine) as llm:
        (output,) = llm.generate([[5, 6]], common_pb2.SamplingParams(max_tokens=2))
        assert len(output.outputs[0].token_ids) == 2
    with pytest.raises(StartupError, match=r"--quantization gptq: .* is a quantized "
                                           r"checkpoint \(awq\): the flag names"):
        LLM(str(checkpoint("llama", "awq")), quantization="gptq", **engine)
    with pytest.raises(StartupError,
                       match=r"--quantization awq: .* is a float checkpoint: the flag names"):
        LLM(str(save_tiny_llama(tmp_path / "float")), quantization="awq", **engine)
