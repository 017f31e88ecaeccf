"""Quantized checkpoints as the Hub ships them: compressed-tensors int8 (W8A8 and W8A16, the
int8 and the int32-packed on-disk formats) and, weight-only, 4-bit values, group scales and
zero points (W4A16, W8A16 per group), made by compressed-tensors' own code from tiny
transformers models, loaded into int8 layers and checked against transformers running the same
checkpoint (which decompresses it, and quantizes activations per token for W8A8, with
compressed-tensors); and what is not supported, refused by name."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.executor.models import UnsupportedArchitectureError, load_model
from pagedserve.executor.models.layers import Linear, bind_kernels, weight_bytes
from pagedserve.executor.models.quantized_checkpoints import checkpoint_quantization
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import TORCH_KERNELS
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.kernels.quantization import Fp8Weight, quantize_fp8
from pagedserve.testing.compressed_tensors_files import (
    decompressed_model,
    save_compressed,
    scheme,
)
from pagedserve.testing.paged_run import assert_matches_transformers
from pagedserve.testing.tiny_models import (
    randomize_weights,
    tiny_gpt_neox_config,
    tiny_llama_config,
    tiny_qwen2_config,
)

VOCAB = 300
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52))]
FAMILIES = {
    "llama-tied": lambda: tiny_llama_config(VOCAB),
    "llama": lambda: tiny_llama_config(VOCAB, tie_word_embeddings=False),
    "qwen2-bias": lambda: tiny_qwen2_config(VOCAB),
    # A fused q/k/v checkpoint tensor: its int8 rows and their scales are split per head.
    "gpt-neox": lambda: tiny_gpt_neox_config(VOCAB),
}
SCHEMES = {"w8a8": ("w8a8", None), "w8a16-packed": ("w8a16", None),
           "w8a16-int8": ("w8a16", "naive-quantized")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(family, scheme_name):
        key = (family, scheme_name)
        if key not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
            randomize_weights(model)
            name, fmt = SCHEMES[scheme_name]
            ignore = ("embed_out",) if family == "gpt-neox" else ("lm_head",)
            cache[key] = save_compressed(model, scheme(name, fmt=fmt),
                                         tmp_path_factory.mktemp(f"{family}-{scheme_name}"),
                                         ignore=ignore)
        return cache[key]
    return get


@pytest.mark.parametrize("kernel_set", ["cpu", "torch"])
@pytest.mark.parametrize("scheme_name", list(SCHEMES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_compressed_tensors_checkpoint_matches_transformers(checkpoints, family, scheme_name,
                                                              kernel_set):
    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    directory = checkpoints(family, scheme_name)
    model = load_model(directory, torch.float32)
    assert model.quantization == ("w8a8_int8" if scheme_name == "w8a8" else "int8")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    head = "embed_out" if family == "gpt-neox" else "lm_head"
    # Every projection is int8 with its float weight released; the head as the checkpoint has
    # it (compressed-tensors' `ignore` matched transformers' name for the LLaMA and Qwen2
    # heads, not GPT-NeoX's).
    with safe_open(directory / "model.safetensors", framework="pt") as checkpoint:
        head_int8 = f"{head}.weight_scale" in checkpoint.keys()
    assert head_int8 == (family == "gpt-neox")
    assert (linears.pop(head).quantized is not None) == head_int8
    assert all(m.quantized is not None and m.weight.numel() == 0 for m in linears.values())
    assert all(m.quantized.dynamic_activations == (scheme_name == "w8a8") for m in linears.values())
    bind_kernels(model, cpu_kernel_set() if kernel_set == "cpu" else TORCH_KERNELS)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    # W8A8: an activation within the last bit of a rounding boundary may round the other way
    # in one of the two implementations (see tests/test_quantization.py).
    tol = 1e-1 if scheme_name == "w8a8" else 1e-4
    assert_matches_transformers(model, reference, PROMPTS, chunk=5, decode_steps=3, tol=tol)


def test_the_int8_layers_hold_the_checkpoints_values(checkpoints):
    """The loaded int8 values and scales are the checkpoint's, packed q/k/v included (the
    int32-packed format unpacked)."""
    from safetensors.torch import load_file

    directory = checkpoints("llama", "w8a16-packed")
    model = load_model(directory, torch.float32)
    tensors = load_file(directory / "model.safetensors")
    packed = tensors["model.layers.0.self_attn.k_proj.weight_packed"]
    expected = (packed.view(torch.uint8).to(torch.int16) - 128).to(torch.int8)
    qkv = model.model.layers[0].self_attn.qkv_proj.quantized
    q_rows, k_rows = 64, 32  # 4 query heads and 2 KV heads of 16
    assert torch.equal(qkv.qweight[q_rows:q_rows + k_rows], expected)
    assert torch.equal(qkv.scales[q_rows:q_rows + k_rows],
                       tensors["model.layers.0.self_attn.k_proj.weight_scale"][:, 0])


def test_a_quantized_checkpoint_takes_its_int8_bytes(checkpoints):
    directory = checkpoints("llama", "w8a8")
    config = AutoConfig.from_pretrained(directory)
    float_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linear_params = sum(m.weight.numel() for name, m in float_model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name != "lm_head")
    float_bytes = sum(p.numel() * 4 for p in float_model.parameters())
    # int8 values (a quarter of float32) plus one float32 scale per output row.
    scale_bytes = sum(m.weight.shape[0] * 4 for name, m in float_model.named_modules()
                      if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert weight_bytes(load_model(directory, torch.float32)) == \
        float_bytes - linear_params * 3 + scale_bytes


def _config_with(directory, tmp_path, change):
    quantization = json.loads((directory / "config.json").read_text())["quantization_config"]
    change(quantization)
    return type("Config", (), {"quantization_config": quantization})()


@pytest.mark.parametrize("change, named", [
    (lambda q: q.update(quant_method="bitsandbytes"),
     "quantization_config.quant_method 'bitsandbytes'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group",
                                                                group_size=128),
     "config_groups.group_0.weights.strategy 'group'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4),
     "config_groups.group_0.weights.num_bits 4"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=2),
     "config_groups.group_0.weights.num_bits 2"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
     "config_groups.group_0.weights.strategy 'tensor'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"),
     "config_groups.group_0.weights.actorder 'group'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"),
     "config_groups.group_0.weights.type 'float'"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False),
     "config_groups.group_0.input_activations.dynamic False"),
    (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"),
     "config_groups.group_0.format 'marlin-24'"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}),
     "quantization_config.kv_cache_scheme"),
])
def test_what_is_not_supported_is_refused_by_name(checkpoints, tmp_path, change, named):
    config = _config_with(checkpoints("llama", "w8a8"), tmp_path, change)
    with pytest.raises(UnsupportedArchitectureError, match=f"{named}.* is not supported"):
        checkpoint_quantization(config)


@pytest.mark.parametrize("family", ["llama-tied", "gpt-neox"])
def test_an_fp8_checkpoint_runs_as_its_scheme_computes(tmp_path, family):
    """compressed-tensors' FP8_DYNAMIC: the e4m3 weights and their scales load into Fp8Weight
    (the form `--quantization fp8` makes), and the model runs as transformers runs the
    checkpoint's decompressed weights with each Linear's activations quantized to e4m3 per
    token (which transformers leaves out); within 0.1, as for W8A8. On the PyTorch path: a
    device with fp8 tensor cores takes torch._scaled_mm (tests/test_quantization.py)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    randomize_weights(model)
    ignore = ("embed_out",) if family == "gpt-neox" else ("lm_head",)
    directory = save_compressed(model, scheme("fp8"), tmp_path / "fp8", ignore=ignore)
    ours = load_model(directory, torch.float32)
    assert ours.quantization == "fp8"
    bind_kernels(ours, TORCH_KERNELS)
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, Linear)}
    # transformers 5 names GPT-NeoX's head lm_head, which `ignore` does not match: quantized.
    assert (linears.pop("lm_head" if family != "gpt-neox" else "embed_out").quantized
            is None) == (family != "gpt-neox")
    assert all(isinstance(m.quantized, Fp8Weight) for m in linears.values())

    class Fp8Reference(torch.nn.Module):
        """A Linear of the checkpoint as transformers keeps it (e4m3 weight, its scales), times
        the activations quantized to e4m3 per token, in float64."""

        def __init__(self, linear):
            super().__init__()
            self.weight = linear.weight.double() * linear.weight_scale.double()
            self.bias = linear.bias

        def forward(self, x):
            rows = quantize_fp8(x.reshape(-1, x.shape[-1])).dequantized(torch.float64)
            y = rows @ self.weight.T
            if self.bias is not None:
                y = y + self.bias.double()
            return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for module in list(hf.modules()):
        for child_name, child in list(module.named_children()):
            if getattr(child, "quantization_scheme", None) is not None:
                setattr(module, child_name, Fp8Reference(child))
    assert_matches_transformers(ours, hf, PROMPTS, chunk=5, decode_steps=3, tol=1e-1)


def test_quantization_flag_on_a_quantized_checkpoint_is_refused(checkpoints):
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError

    with pytest.raises(StartupError, match="quantized checkpoint already \\(w8a8_int8\\)"):
        LLM(str(checkpoints("llama", "w8a8")), dtype="float32", quantization="int8",
            kv_cache_gib=0.01)


def test_moving_the_model_moves_its_int8_weights(checkpoints):
    """The executor loads on the CPU, then moves the model to its device: the int8 values and
    scales loaded from the checkpoint go along (they are no parameters), the scales float32."""
    model = load_model(checkpoints("llama", "w8a8"), torch.float32)
    layer = model.model.layers[0].self_attn.qkv_proj
    values = layer.quantized.qweight.clone()
    model.to(torch.device("meta"))
    weight = layer.quantized
    assert weight.qweight.device.type == "meta" and weight.scales.device.type == "meta"
    model = load_model(checkpoints("llama", "w8a8"), torch.float32).to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.qkv_proj
    weight = layer.quantized
    assert torch.equal(weight.qweight, values) and weight.scales.dtype == torch.float32


# Weight-only schemes with group scales, 4-bit values or zero points (GroupedWeight), in
# groups of 32 (the tiny models' rows are 64 and 128 wide; llm-compressor's default is 128).
GROUPED = {
    "w4a16": ("W4A16", {"group_size": 32}),
    "w4a16-asym": ("W4A16_ASYM", {"group_size": 32}),
    "w4a16-channel": ("W4A16", {"strategy": "channel", "group_size": None}),
    "w8a16-group": ("W8A16", {"group_size": 32}),
    "w8a16-asym": ("W8A16", {"group_size": 32, "symmetric": False}),
}


@pytest.mark.parametrize("kernel_set", ["cpu", "torch"])
@pytest.mark.parametrize("scheme_name, family", [
    (name, family) for name in GROUPED for family in FAMILIES
    # decompressed_model (the zero points' reference) reads LLaMA's tensor names; the other
    # families' layers with offsets are the 4-bit symmetric cases'.
    if family == "llama-tied" or not name.endswith("asym")])
def test_group_and_4bit_checkpoints_match_transformers(tmp_path, scheme_name, family,
                                                       kernel_set):
    """compressed-tensors' own writers; transformers decompresses the same checkpoint, except
    with zero points, which transformers (5.x) does not load from pack-quantized checkpoints
    (it warns of a size mismatch and leaves them random): compressed-tensors' own compressor
    decompresses those."""
    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    from compressed_tensors.quantization import preset_name_to_scheme

    preset, weights = GROUPED[scheme_name]
    quantization = preset_name_to_scheme(preset, ["Linear"])
    quantization.weights = quantization.weights.model_copy(update=weights)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    randomize_weights(model)
    ignore = ("embed_out",) if family == "gpt-neox" else ("lm_head",)
    directory = save_compressed(model, quantization, tmp_path / scheme_name, ignore=ignore)
    ours = load_model(directory, torch.float32)
    assert ours.quantization == ("w4a16" if scheme_name.startswith("w4") else "int8")
    bind_kernels(ours, cpu_kernel_set() if kernel_set == "cpu" else TORCH_KERNELS)
    linears = [m for n, m in ours.named_modules() if isinstance(m, Linear)
               and not n.endswith(("lm_head", "embed_out"))]
    assert linears and all(m.quantized is not None and m.weight.numel() == 0 for m in linears)
    if kernel_set == "cpu":
        assert {m.quantized.bits for m in linears} == {4 if scheme_name.startswith("w4") else 8}
    if scheme_name.endswith("asym"):
        reference = decompressed_model(directory)
    else:
        reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    assert_matches_transformers(ours, reference, PROMPTS, chunk=5, decode_steps=3, tol=1e-4)


def test_an_fp8_checkpoint_is_refused_where_no_fp8_tensor_cores_are(tmp_path):
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB), dtype=torch.float32)
    directory = save_compressed(model, scheme("fp8"), tmp_path / "fp8")
    with pytest.raises(StartupError, match=r"is an fp8 checkpoint: it needs a CUDA GPU with fp8 "
                                           r"tensor cores .* cpu has none"):
        LLM(str(directory), device="cpu", kv_cache_gib=0.01)


def test_a_static_fp8_kv_cache_scheme_loads_its_scales(checkpoints, tmp_path):
    """A compressed-tensors checkpoint with a static per-tensor fp8 `kv_cache_scheme` (its
    config and `self_attn.k_scale` / `v_scale` tensors, as llm-compressor writes them after
    calibrating) loads: the weights as their scheme says, the scales into each attention."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pagedserve.executor.models.layers import PagedAttention

    directory = tmp_path / "kv"
    shutil.copytree(checkpoints("llama", "w8a16-packed"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {
        "num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
        "symmetric": True}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + i)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model = load_model(directory, torch.float32)
    assert model.quantization == "int8"
    assert [(m.checkpoint_k_scale, m.checkpoint_v_scale) for m in model.modules()
            if isinstance(m, PagedAttention)] == [(0.5, 0.25), (1.5, 0.25)]
