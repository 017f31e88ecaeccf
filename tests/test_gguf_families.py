"""Every family llama.cpp's converter writes that pagedserve converts back
(executor_svc/pagedserve/executor/gguf_to_hf.py ARCHITECTURES: LLaMA, Mixtral, Qwen2, Qwen3,
Phi-3, Gemma 2, Gemma 3, GPT-2, Falcon, Qwen2-MoE, Qwen3-MoE): a tiny random model written as
llama.cpp writes it (pagedserve/testing/gguf_files.py, with the gguf package's own tensor-name
table and metadata keys), converted, loaded and run. In F32 it is the original model: against
transformers on the original weights. In Q8_0, run natively (experts dequantized), it is
transformers on its dequantized conversion."""

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.executor.gguf_to_hf import GGUFConversionError
from pagedserve.executor.model_files import ModelLoadError, resolve_model
from pagedserve.executor.models import load_model
from pagedserve.testing.gguf_files import write_gguf
from pagedserve.testing.paged_run import assert_matches_transformers
from pagedserve.testing.tiny_models import (
    byte_level_tokenizer,
    randomize_weights,
    tiny_falcon_config,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_mixtral_config,
    tiny_phi3_config,
    tiny_qwen2_config,
    tiny_qwen2_moe_config,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)

Q = gguf.GGMLQuantizationType
VOCAB = len(byte_level_tokenizer())
PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52))]
FAMILIES = {
    "llama": lambda: tiny_llama_config(VOCAB, tie_word_embeddings=False),
    "qwen2-bias-tied": lambda: tiny_qwen2_config(VOCAB),
    "qwen3-qk-norm": lambda: tiny_qwen3_config(VOCAB),
    "phi3-window-partial-rotary": lambda: tiny_phi3_config(
        VOCAB, sliding_window=8, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                         "partial_rotary_factor": 0.5}),
    # llama.cpp scales scores by 1 / sqrt(head_dim) (query_pre_attn_scalar = head_dim); its
    # windows alternate every other layer for Gemma 2, every sixth for Gemma 3.
    "gemma2-caps": lambda: tiny_gemma2_config(VOCAB, query_pre_attn_scalar=32),
    "gemma3-local-and-global": lambda: tiny_gemma3_config(
        VOCAB, query_pre_attn_scalar=32, num_hidden_layers=6, layer_types=None,
        final_logit_softcapping=None),
    "gpt2": lambda: tiny_gpt2_config(VOCAB),
    # Falcon-40B's layout (grouped KV, two norms) and Falcon-7B's (multi-query, one norm).
    "falcon-40b-style": lambda: tiny_falcon_config(VOCAB, tie_word_embeddings=False),
    "falcon-7b-style": lambda: tiny_falcon_config(VOCAB, new_decoder_architecture=False,
                                                  multi_query=True, parallel_attn=True),
    "mixtral": lambda: tiny_mixtral_config(VOCAB),
    # llama.cpp's Qwen2-MoE has experts on every layer. Rows of whole Q8_0 blocks (32).
    "qwen2-moe-shared-expert": lambda: tiny_qwen2_moe_config(
        VOCAB, mlp_only_layers=[], moe_intermediate_size=64, shared_expert_intermediate_size=96),
    "qwen3-moe": lambda: tiny_qwen3_moe_config(VOCAB, moe_intermediate_size=64),
}


def _model(family: str):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    randomize_weights(model)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_f32_gguf_is_the_model_it_was_written_from(tmp_path, family):
    original = _model(family)
    path = tmp_path / f"{family}.gguf"
    write_gguf(original, byte_level_tokenizer(), path)
    converted = resolve_model(str(path), tmp_path / "cache")
    model = load_model(converted.path, torch.float32)
    assert type(model).__name__ == type(original).__name__
    assert_matches_transformers(model, original, PROMPTS, chunk=5, decode_steps=3)


@pytest.mark.parametrize("family", ["qwen2-bias-tied", "qwen3-qk-norm", "mixtral",
                                    "qwen2-moe-shared-expert", "gpt2", "falcon-40b-style"])
def test_a_q8_0_gguf_runs_natively_as_transformers_runs_its_dequantized_conversion(
        tmp_path, family):
    path = tmp_path / f"{family}.gguf"
    write_gguf(_model(family), byte_level_tokenizer(), path, quant=Q.Q8_0)
    native = resolve_model(str(path), tmp_path / "cache")
    dequantized = resolve_model(str(path), tmp_path / "cache", gguf_dequantize=True)
    model = load_model(native.path, torch.float32)
    assert model.quantization == "gguf"
    hf = AutoModelForCausalLM.from_pretrained(dequantized.path, dtype=torch.float32).eval()
    assert_matches_transformers(model, hf, PROMPTS, chunk=5, decode_steps=3)


def test_an_architecture_it_does_not_convert_is_refused_by_name(tmp_path):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises((ModelLoadError, GGUFConversionError),
                       match="GGUF architecture 'mamba' is not supported for conversion "
                             r"\(supported: llama, qwen2, qwen3, phi3, gemma2, gemma3, gpt2, "
                             r"falcon, qwen2moe, qwen3moe\)"):
        resolve_model(str(path), tmp_path / "cache")


@pytest.mark.parametrize("quant", [Q.F32, Q.Q8_0], ids=["F32", "Q8_0"])
def test_a_longrope_phi3_gguf_is_the_model_past_its_trained_length(tmp_path, quant):
    """LongRoPE's factors travel as tensors (and its attention factor as a key): trained on 8
    positions, served to 64, prompts longer than 8 (where transformers uses the long factors,
    as pagedserve does everywhere: models/rope.py)."""
    original = AutoModelForCausalLM.from_config(tiny_phi3_config(
        VOCAB, max_position_embeddings=64, original_max_position_embeddings=8,
        tie_word_embeddings=False, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 5.0, 11.0]}),
        dtype=torch.float32).eval()
    randomize_weights(original)
    path = tmp_path / "phi3-longrope.gguf"
    write_gguf(original, byte_level_tokenizer(), path, quant=quant)
    converted = resolve_model(str(path), tmp_path / "cache")
    rope = converted.config["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == [1.0, 2.0, 5.0, 11.0]
    reference = original if quant == Q.F32 else AutoModelForCausalLM.from_pretrained(
        resolve_model(str(path), tmp_path / "cache", gguf_dequantize=True).path,
        dtype=torch.float32).eval()
    prompts = [list(range(20, 29)), list(range(40, 52)), list(range(60, 83))]
    assert_matches_transformers(load_model(converted.path, torch.float32), reference, prompts,
                                chunk=5, decode_steps=3)
