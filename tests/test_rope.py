"""Rotary tables: frequencies and attention factors against transformers' own rope
initialisation for every scaled rope type, dynamic NTK's per-position bases, the cos/sin table
against its definition, the context length each type serves, and whole models with YaRN and
dynamic NTK against transformers past their trained length."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedserve.executor.models import UnsupportedArchitectureError, load_model
from pagedserve.executor.models.rope import (
    context_length,
    rotary_cos_sin_cache,
    rotary_frequencies,
)
from pagedserve.testing.paged_run import PagedRun, assert_matches_transformers, prefill
from pagedserve.testing.tiny_models import save_tiny_model, tiny_llama_config, tiny_phi3_config

HEAD_DIM = 64
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 128}
SCALED = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": YARN,
    # Qwen-style betas and an explicit attention factor.
    "yarn-betas-attention-factor": {**YARN, "beta_fast": 16, "beta_slow": 2,
                                    "attention_factor": 0.9},
    # DeepSeek-style mscale pair: the factor is their ratio.
    "yarn-mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn-untruncated": {**YARN, "truncate": False},
}


def _config(params, **overrides):
    values = dict(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=512,
                  rope_parameters=dict(params))
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.mark.parametrize("variant", list(SCALED))
def test_scaled_frequencies_match_transformers(variant):
    params = SCALED[variant]
    config = _config(params)
    expected, expected_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    inv_freq, factor = rotary_frequencies(config.rope_parameters, HEAD_DIM, 512)
    # transformers computes in float32.
    torch.testing.assert_close(inv_freq.float(), expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0,
            "original_max_position_embeddings": 128,
            "short_factor": [1.0 + i / 64 for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + i / 4 for i in range(HEAD_DIM // 2)]}


@pytest.mark.parametrize("max_positions, expected_seq_len", [
    (512, 129),  # served past the trained 128: the long factors, for every position
    (128, None),  # served within it: the short ones
])
def test_longrope_frequencies_match_transformers(max_positions, expected_seq_len):
    config = _config(LONGROPE, max_position_embeddings=max_positions)
    expected, expected_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu",
                                                                seq_len=expected_seq_len)
    inv_freq, factor = rotary_frequencies(config.rope_parameters, HEAD_DIM, max_positions)
    torch.testing.assert_close(inv_freq.float(), expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    assert (factor > 1) == (max_positions > 128)


def test_longrope_factors_of_the_wrong_length_are_refused_naming_the_field():
    config = _config({**LONGROPE, "long_factor": [1.0] * 3})
    with pytest.raises(UnsupportedArchitectureError, match="rope_parameters.long_factor has 3 "
                                                           "values"):
        rotary_cos_sin_cache(config, HEAD_DIM)


def test_yarn_scales_cos_and_sin_by_its_attention_factor():
    config = _config(YARN)
    inv_freq, factor = rotary_frequencies(config.rope_parameters, HEAD_DIM, 512)
    assert factor > 1.1  # 0.1 ln 4 + 1
    angles = torch.arange(512, dtype=torch.float64)[:, None] * inv_freq
    expected = (torch.cat((angles.cos(), angles.sin()), dim=-1) * factor).float()
    torch.testing.assert_close(rotary_cos_sin_cache(config, HEAD_DIM), expected)


def test_dynamic_ntk_rotates_each_position_with_the_base_of_its_length():
    """Position p of the table: transformers' dynamic NTK frequencies for a sequence of
    p + 1 tokens (the trained ones for p below the trained length)."""
    trained = 64
    config = _config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                     max_position_embeddings=trained)
    table = rotary_cos_sin_cache(config, HEAD_DIM)
    assert table.shape == (2 * trained, HEAD_DIM)
    compute = ROPE_INIT_FUNCTIONS["dynamic"]
    for position in [0, trained - 2, trained - 1, trained, trained + 1, 2 * trained - 1]:
        inv_freq, _ = compute(config, "cpu", seq_len=position + 1)
        angles = position * inv_freq.double()
        expected = torch.cat((angles.cos(), angles.sin())).float()
        torch.testing.assert_close(table[position], expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, p=position: f"position {p}: {m}")
    # Past the trained length the base grows: the table is not the trained one there.
    trained_angles = (2 * trained - 1) * compute(config, "cpu")[0].double()
    assert (table[-1, :HEAD_DIM // 2] - trained_angles.cos().float()).abs().max() > 1e-3


def test_cos_sin_table_follows_the_definition():
    config = _config({"rope_type": "default", "rope_theta": 10000.0})
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).double() / HEAD_DIM)
    angles = torch.arange(512).double()[:, None] * inv_freq
    expected = torch.cat((angles.cos(), angles.sin()), dim=-1).float()
    torch.testing.assert_close(rotary_cos_sin_cache(config, HEAD_DIM), expected)


@pytest.mark.parametrize("params, expected", [
    ({"rope_type": "default", "rope_theta": 1e4}, 512),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}, 512),
    (SCALED["llama3"], 512),
    ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.5}, 1280),
    (YARN, 512),  # 4 x 128 = 512: the config already says so
    ({**YARN, "original_max_position_embeddings": 512}, 2048),  # Qwen2.5's shape
])
def test_context_length_per_rope_type(params, expected):
    assert context_length(_config(params)) == expected


def test_an_unknown_rope_type_is_refused_naming_the_field():
    config = _config({"rope_type": "default", "rope_theta": 1e4})
    config.rope_parameters = {"rope_type": "mrope", "rope_theta": 1e4}
    with pytest.raises(UnsupportedArchitectureError,
                       match="rope_parameters.rope_type 'mrope' is not supported"):
        rotary_cos_sin_cache(config, HEAD_DIM)


VOCAB = 300


def _tiny(tmp_path, rope_parameters, **overrides):
    config = tiny_llama_config(VOCAB, rope_parameters=rope_parameters, **overrides)
    directory = save_tiny_model(tmp_path, config)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return load_model(directory, torch.float32), reference


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_yarn_model_matches_transformers_past_its_trained_length(tmp_path, chunk):
    """Trained on 8 positions, prompts up to 23 tokens and 6 decodes."""
    model, reference = _tiny(tmp_path, {"rope_type": "yarn", "rope_theta": 10000.0,
                                        "factor": 8.0, "original_max_position_embeddings": 8},
                             max_position_embeddings=64)
    prompts = [[5], list(range(20, 27)), list(range(60, 83))]
    assert_matches_transformers(model, reference, prompts, chunk)


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_longrope_phi3_matches_transformers_past_its_trained_length(tmp_path, chunk):
    """Trained on 8 positions, served to 64, rotary on half of each head: prompts of 9 to 23
    tokens and 6 decodes, each longer than the trained length (where transformers uses the
    long factors too)."""
    half = 4  # rotary_dim 8 of head_dim 16: 4 channel pairs
    config = tiny_phi3_config(VOCAB, max_position_embeddings=64,
                              original_max_position_embeddings=8, rope_parameters={
                                  "rope_type": "longrope", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.1, 1.3, 1.6][:half],
                                  "long_factor": [1.0, 2.0, 5.0, 11.0][:half]})
    directory = save_tiny_model(tmp_path, config)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [list(range(20, 29)), list(range(40, 52)), list(range(60, 83))]
    assert_matches_transformers(load_model(directory, torch.float32), reference, prompts, chunk)


def test_a_dynamic_ntk_model_matches_transformers_generation_past_its_trained_length(tmp_path):
    """Trained on 16 positions (factor 2: 32 served): a 10-token prompt, then decodes to
    position 29, against transformers generating with its KV cache (whose keys keep the base
    of the length at which each was computed)."""
    model, reference = _tiny(tmp_path, {"rope_type": "dynamic", "rope_theta": 10000.0,
                                        "factor": 2.0}, max_position_embeddings=16)
    prompt = list(range(40, 50))
    run = PagedRun(model)
    (table,), (logits,) = prefill(run, [prompt], chunk=4)
    with torch.no_grad():
        out = reference(torch.tensor([prompt]), use_cache=True)
    tokens = list(prompt)
    for step in range(20):
        torch.testing.assert_close(logits, out.logits[0, -1], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, s=step: f"after {s} decodes: {m}")
        tokens.append(int(out.logits[0, -1].argmax()))
        (logits,) = run.step([(table, [tokens[-1]], len(tokens) - 1)])
        with torch.no_grad():
            out = reference(torch.tensor([[tokens[-1]]]), cache=out.past_key_values,
                            use_cache=True)
    assert len(tokens) > 2 * 16 - 4  # well past the trained length


def test_an_executor_serves_the_context_its_rope_scaling_extends_to(tmp_path):
    """Dynamic NTK with factor 2 over 16 trained positions: --max-model-len up to 32 starts
    (and is what the executor describes by default), 33 is refused naming both lengths."""
    from pagedserve.executor.bootstrap import build_runner
    from pagedserve.executor.config import EngineConfig
    from pagedserve.executor.model_files import resolve_model
    from pagedserve.runtime.serving import StartupError

    directory = tmp_path / "model"
    save_tiny_model(directory, tiny_llama_config(
        VOCAB, max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    model_dir = resolve_model(str(directory), tmp_path)

    def start(max_model_len):
        return build_runner(EngineConfig(model=str(directory), dtype="float32",
                                         kv_cache_gib=0.01, max_model_len=max_model_len),
                            model_dir)
    assert start(None).limits.max_model_len == 32
    with pytest.raises(StartupError, match="--max-model-len 33 exceeds the model's context "
                                           "length 32"):
        start(33)
