"""Mistral, Qwen2, Qwen3, GPT-NeoX, Falcon and GPT-2 for the flat paged batch against
`transformers` on the same random weights (biases and norms included): prompts of different
lengths in one flat batch, whole and chunked, then batched decode steps; plus the per-family
sliding-window rules, the fused q/k/v split and the errors for what is not supported."""

import json
import shutil

import pytest
import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve.executor.models import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    load_model,
    model_class,
)
from pagedserve.executor.models.layers import bind_kernels, split_grouped_qkv
from pagedserve.executor.models.weights import WeightLoadError
from pagedserve.kernels import cpu_kernels as c_kernels
from pagedserve.kernels.dispatch import cpu_kernels
from pagedserve.testing.paged_run import PagedRun, assert_matches_transformers, prefill
from pagedserve.testing.tiny_models import (
    save_tiny_model,
    tiny_falcon_config,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gemma_config,
    tiny_gpt2_config,
    tiny_gpt_neox_config,
    tiny_mistral_config,
    tiny_mixtral_config,
    tiny_phi3_config,
    tiny_qwen2_config,
    tiny_qwen2_moe_config,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)

VOCAB = 300
needs_c_kernels = pytest.mark.skipif(not c_kernels.available(),
                                     reason="no C compiler: the CPU kernels are not built")
# Lengths 1 to 23 with a sliding window of 8: the window cuts the longer prompts and every decode.
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52)), list(range(60, 83))]

VARIANTS = {
    "mistral-window": lambda: tiny_mistral_config(VOCAB, sliding_window=8),
    "mistral-no-window": lambda: tiny_mistral_config(VOCAB, sliding_window=None),
    # A window in the config but use_sliding_window false, as Qwen2.5 checkpoints ship it.
    "qwen2": lambda: tiny_qwen2_config(VOCAB),
    # Window on the layers from max_window_layers (1) on: layer 0 full, layer 1 windowed.
    "qwen2-window": lambda: tiny_qwen2_config(VOCAB, use_sliding_window=True),
    # q/k normed per head, heads wider than hidden / heads, no bias; then with a window, and
    # with attention_bias (q/k/v and o).
    "qwen3": lambda: tiny_qwen3_config(VOCAB),
    "qwen3-window-bias": lambda: tiny_qwen3_config(VOCAB, use_sliding_window=True,
                                                   attention_bias=True),
    # Fused qkv_proj and gate_up_proj split at load; then with a window on every layer and
    # rotary on half of each head (Phi-4-mini's partial_rotary_factor).
    "phi3": lambda: tiny_phi3_config(VOCAB),
    "phi3-window-partial-rotary": lambda: tiny_phi3_config(
        VOCAB, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5}),
    # Top-2 of 4 experts renormalised, a window on every layer.
    "mixtral-window": lambda: tiny_mixtral_config(VOCAB, sliding_window=8),
    # A dense layer, then top-2 of 6 experts not renormalised, a sigmoid-gated shared expert.
    "qwen2-moe": lambda: tiny_qwen2_moe_config(VOCAB),
    # Top-3 of 8 renormalised, q/k norms; then every second layer sparse (decoder_sparse_step).
    "qwen3-moe": lambda: tiny_qwen3_moe_config(VOCAB),
    "qwen3-moe-sparse-step": lambda: tiny_qwen3_moe_config(VOCAB, decoder_sparse_step=2,
                                                           norm_topk_prob=False),
    "gpt-neox-parallel": lambda: tiny_gpt_neox_config(VOCAB),
    "gpt-neox-sequential": lambda: tiny_gpt_neox_config(
        VOCAB, use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu_new",
        tie_word_embeddings=True),
    # Learned positions, Conv1D weights, fused q/k/v in thirds, tied head; then an untied
    # head, a 96-wide MLP and the attention scale divided by the layer's index + 1.
    "gpt2": lambda: tiny_gpt2_config(VOCAB),
    "gpt2-untied-inner-scaled": lambda: tiny_gpt2_config(
        VOCAB, tie_word_embeddings=False, n_inner=96, scale_attn_by_inverse_layer_idx=True,
        activation_function="gelu"),
    # GeGLU, scaled embeddings, norms as offsets from one, multi-query; a tanh-approximated
    # gate spelled "gelu" (old configs), untied.
    "gemma": lambda: tiny_gemma_config(VOCAB),
    "gemma-untied": lambda: tiny_gemma_config(VOCAB, hidden_act="gelu", tie_word_embeddings=False),
    # Sandwich norms, query_pre_attn_scalar, a window on layer 0, attention scores and final
    # logits soft-capped (caps small enough to bite); then without the caps.
    "gemma2": lambda: tiny_gemma2_config(VOCAB),
    "gemma2-no-caps": lambda: tiny_gemma2_config(VOCAB, attn_logit_softcapping=None,
                                                 final_logit_softcapping=None),
    # q/k norms, local and global rope tables, a final cap.
    "gemma3": lambda: tiny_gemma3_config(VOCAB, final_logit_softcapping=3.0),
    "falcon-new-arch": lambda: tiny_falcon_config(VOCAB),
    "falcon-new-arch-one-norm-bias": lambda: tiny_falcon_config(
        VOCAB, num_ln_in_parallel_attn=1, bias=True, tie_word_embeddings=False),
    "falcon-multi-query-parallel": lambda: tiny_falcon_config(
        VOCAB, new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "falcon-multi-head-sequential": lambda: tiny_falcon_config(
        VOCAB, new_decoder_architecture=False, multi_query=False, num_kv_heads=4,
        parallel_attn=False, bias=True),
}


def _patch_config(directory, **values):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Each variant saved once, on first use."""
    cache = {}

    def get(variant):
        if variant not in cache:
            directory = save_tiny_model(tmp_path_factory.mktemp(variant), VARIANTS[variant]())
            if variant == "qwen2":
                _patch_config(directory, sliding_window=8, use_sliding_window=False)
            cache[variant] = directory
        return cache[variant]
    return get


def _reference(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_matches_transformers(tiny_dirs, variant, chunk):
    directory = tiny_dirs(variant)
    model = load_model(directory, torch.float32)
    assert type(model).__name__ == AutoConfig.from_pretrained(directory).architectures[0]
    assert_matches_transformers(model, _reference(directory), PROMPTS, chunk)


# One variant per kernel feature: GQA + sliding window, partial rotary + GELU (no SiLU), MQA,
# per-head q/k norms over a head wider than hidden / heads, no rotary and a scale per layer,
# soft-capped scores with a window and a custom scale, two rope tables, routed experts.
@pytest.mark.parametrize("variant", ["mistral-window", "gpt-neox-sequential",
                                     "falcon-multi-query-parallel", "qwen3-window-bias",
                                     "gpt2-untied-inner-scaled", "gemma", "gemma2", "gemma3",
                                     "phi3-window-partial-rotary", "mixtral-window",
                                     "qwen2-moe", "qwen3-moe"])
@pytest.mark.parametrize("kernel_set", ["triton", "cpu"])
def test_kernel_sets_match_transformers(tiny_dirs, variant, kernel_set):
    """The whole model on the Triton kernel set (under Triton's interpreter on CPU; compiled
    on a GPU) and on the cpu set (C decode attention), chunked prefill then decodes, against
    transformers."""
    from pagedserve.kernels import cpu_kernels, dispatch

    if kernel_set == "cpu" and not cpu_kernels.available():
        pytest.skip("no C compiler: the CPU kernel is not built")
    directory = tiny_dirs(variant)
    model = load_model(directory, torch.float32)
    bind_kernels(model, getattr(dispatch, f"{kernel_set}_kernels")())
    assert_matches_transformers(model, _reference(directory), PROMPTS, chunk=5, decode_steps=3)


# The kernel test's variants but the MoE ones, whose capture is refused (below).
@pytest.mark.parametrize("variant", ["mistral-window", "gpt-neox-sequential",
                                     "falcon-multi-query-parallel", "qwen3-window-bias",
                                     "gpt2-untied-inner-scaled", "gemma", "gemma2", "gemma3",
                                     "phi3-window-partial-rotary"])
@needs_c_kernels
def test_cpu_graphs_match_transformers(tiny_dirs, variant):
    """Decode steps replayed from CPU graphs of the C kernel set (decode_graphs.py): whatever
    PyTorch operators a family runs between the kernels are replayed too."""
    directory = tiny_dirs(variant)
    model = load_model(directory, torch.float32)
    bind_kernels(model, cpu_kernels())
    assert_matches_transformers(model, _reference(directory), PROMPTS, chunk=5, decode_steps=3,
                                graphs=True)


@pytest.mark.parametrize("variant", ["mixtral-window", "qwen2-moe", "qwen3-moe"])
@needs_c_kernels
def test_moe_routing_is_not_captured(tiny_dirs, variant):
    """The experts a step runs follow the router's choices, read on the host: no CPU graph
    (the executor then runs decode steps eagerly)."""
    model = load_model(tiny_dirs(variant), torch.float32)
    bind_kernels(model, cpu_kernels())
    with structlog.testing.capture_logs() as logs, \
            pytest.raises(RuntimeError, match="could not be captured"):
        PagedRun(model, graphs=True)
    assert "aten.bincount" in logs[0]["error"]


@pytest.mark.parametrize("variant, disable", [
    ("mistral-window", {"sliding_window": None}),
    ("qwen2-window", {"use_sliding_window": False, "layer_types": None}),
])
def test_the_sliding_window_changes_the_logits(tiny_dirs, tmp_path, variant, disable):
    """The windowed variants are tested where the window matters: the same weights without
    the window give transformers other logits for the longest prompt."""
    directory = tiny_dirs(variant)
    _, logits = prefill(PagedRun(load_model(directory, torch.float32)), PROMPTS, None)
    unwindowed_dir = shutil.copytree(directory, tmp_path / "unwindowed")
    _patch_config(unwindowed_dir, **disable)
    with torch.no_grad():
        unwindowed = _reference(unwindowed_dir)(torch.tensor([PROMPTS[-1]])).logits[0, -1]
    assert (logits[-1] - unwindowed).abs().max() > 1e-2


def _windows(config):
    model = model_class(config.architectures)(config, torch.float32)
    return [m.sliding_window for m in model.modules() if hasattr(m, "sliding_window")]


def test_sliding_window_rules_per_family():
    mistral = tiny_mistral_config(VOCAB, sliding_window=8, architectures=["MistralForCausalLM"])
    assert _windows(mistral) == [8, 8]
    qwen2_on = tiny_qwen2_config(VOCAB, use_sliding_window=True,
                                 architectures=["Qwen2ForCausalLM"])
    assert _windows(qwen2_on) == [None, 8]
    # Window fields left in a config (set after transformers normalised it) are not used by
    # Qwen2 unless use_sliding_window is set, nor ever by LLaMA.
    qwen2_off = tiny_qwen2_config(VOCAB, architectures=["Qwen2ForCausalLM"])
    qwen2_off.sliding_window = 8
    qwen2_off.layer_types = ["full_attention", "sliding_attention"]
    assert _windows(qwen2_off) == [None, None]
    llama = tiny_mistral_config(VOCAB, sliding_window=8, architectures=["LlamaForCausalLM"])
    assert _windows(llama) == [None, None]


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_split_grouped_qkv(num_heads, num_kv_heads):
    """Per KV head: its queries, its key, its value (GPT-NeoX / multi-head Falcon when the
    head counts are equal, multi-query Falcon with one KV head, the new Falcon otherwise)."""
    head_dim, hidden = 3, 5
    q = torch.randn(num_heads, head_dim, hidden)
    k = torch.randn(num_kv_heads, head_dim, hidden)
    v = torch.randn(num_kv_heads, head_dim, hidden)
    group = num_heads // num_kv_heads
    fused = torch.cat([torch.cat([q[g * group:(g + 1) * group], k[g:g + 1], v[g:g + 1]])
                       for g in range(num_kv_heads)]).reshape(-1, hidden)
    got = split_grouped_qkv(fused, num_kv_heads, head_dim)
    for tensor, expected in zip(got, (q, k, v), strict=True):
        assert torch.equal(tensor, expected.reshape(-1, hidden))
    bias_q, bias_k, bias_v = split_grouped_qkv(fused[:, 0].contiguous(), num_kv_heads, head_dim)
    assert torch.equal(bias_k, k[..., 0].reshape(-1))
    with pytest.raises(ValueError, match="does not split"):
        split_grouped_qkv(fused[:-1], num_kv_heads, head_dim)


def test_misshapen_fused_qkv_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_tiny_model(tmp_path, tiny_gpt_neox_config(VOCAB))
    weights = load_file(directory / "model.safetensors")
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    weights[name] = weights[name][:-16]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=name):
        load_model(directory, torch.float32)


def test_a_tied_head_stored_anyway_is_skipped(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = save_tiny_model(tmp_path, tiny_falcon_config(VOCAB))  # tied
    weights = load_file(directory / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = torch.zeros_like(weights["transformer.word_embeddings.weight"])
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    model = load_model(directory, torch.float32)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, weights["transformer.word_embeddings.weight"])


def test_gpt2_loads_checkpoints_saved_without_the_base_model_prefix(tiny_dirs, tmp_path):
    """As the original GPT-2 checkpoints are stored: `h.0.attn.c_attn.weight`, no
    `transformer.`, and the causal mask buffers `attn.bias` / `attn.masked_bias`."""
    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(tiny_dirs("gpt2"), tmp_path / "old")
    weights = load_file(directory / "model.safetensors")
    old = {name.removeprefix("transformer."): t for name, t in weights.items()}
    for layer in range(2):
        old[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
        old[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(name.startswith("transformer.") for name in old)
    save_file(old, directory / "model.safetensors", metadata={"format": "pt"})
    assert_matches_transformers(load_model(directory, torch.float32),
                                _reference(tiny_dirs("gpt2")), PROMPTS, chunk=None,
                                decode_steps=1)


def test_gpt2_with_cross_attention_is_refused(tmp_path):
    config = tiny_gpt2_config(VOCAB, add_cross_attention=True,
                              architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="add_cross_attention"):
        model_class(config.architectures)(config, torch.float32)


def test_moe_experts_load_from_the_stacked_form_too(tiny_dirs, tmp_path):
    """transformers 5's in-memory form (`experts.gate_up_proj` [experts, 2 * intermediate,
    hidden], `experts.down_proj`) loads as the per-expert tensors do."""
    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(tiny_dirs("mixtral-window"), tmp_path / "stacked")
    weights = load_file(directory / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        experts = [[weights.pop(f"{prefix}.{e}.{w}.weight") for w in ("w1", "w3", "w2")]
                   for e in range(4)]
        weights[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([gate, up]) for gate, up, _ in experts])
        weights[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [down for _, _, down in experts])
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    assert_matches_transformers(load_model(directory, torch.float32),
                                _reference(tiny_dirs("mixtral-window")), PROMPTS, chunk=None,
                                decode_steps=1)


@pytest.mark.parametrize("change, error", [
    ("drop", r"checkpoint lacks 1 tensors, e.g. \['model.layers.1.mlp.experts.w2'\]"),
    ("misshape", "model.layers.1.block_sparse_moe.experts: the experts' w2 tensors do not "
                 "stack"),
    ("extra", "model.layers.1.block_sparse_moe.experts.4.w2.weight: expert 4, but the config "
              "has 4"),
    ("quantized", r"model.layers.1.mlp.experts.w2: w2: quantized experts \(torch.int8\) are "
                  "not supported"),
])
def test_a_bad_expert_tensor_is_refused_naming_it(tiny_dirs, tmp_path, change, error):
    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(tiny_dirs("mixtral-window"), tmp_path / change)
    weights = load_file(directory / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    if change == "drop":
        del weights[name]
    elif change == "misshape":
        weights[name] = weights[name][:, :-8].contiguous()
    elif change == "extra":
        weights[name.replace("experts.2", "experts.4")] = weights[name].clone()
    else:  # every expert's down projection of layer 1 as int8
        for e in range(4):
            key = name.replace("experts.2", f"experts.{e}")
            weights[key] = weights[key].to(torch.int8)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=error):
        load_model(directory, torch.float32)


def test_a_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: its text model is served
    alone, from the checkpoint's `language_model` tensors (the vision tower's and the
    projector's not loaded), as transformers' multimodal model answers text prompts."""
    from transformers import Gemma3Config

    config = Gemma3Config(
        # No final soft-cap, as the released checkpoints (transformers' multimodal class never
        # applies one; its text class, and pagedserve, would).
        text_config=tiny_gemma3_config(VOCAB).to_dict(),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, architectures=["Gemma3ForConditionalGeneration"])
    directory = save_tiny_model(tmp_path, config)
    model = load_model(directory, torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    reference = _reference(directory)
    assert type(reference).__name__ == "Gemma3ForConditionalGeneration"
    assert_matches_transformers(model, reference, PROMPTS, chunk=5, decode_steps=3)


def test_falcon_alibi_is_a_clear_error(tmp_path):
    directory = save_tiny_model(tmp_path, tiny_falcon_config(
        VOCAB, alibi=True, new_decoder_architecture=False, multi_query=False, num_kv_heads=4))
    with pytest.raises(UnsupportedArchitectureError, match="alibi"):
        load_model(directory, torch.float32)


def test_unsupported_architecture_names_every_supported_one():
    with pytest.raises(UnsupportedArchitectureError) as info:
        model_class(["MambaForCausalLM"])
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "GPTNeoXForCausalLM", "FalconForCausalLM",
                 "GPT2LMHeadModel", "Gemma2ForCausalLM", "Phi3ForCausalLM",
                 "MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        assert name in ARCHITECTURES and name in str(info.value)
