"""Model resolution and GGUF conversion: a GGUF written here from a random-weight transformers
model converts back to that model (weights exactly, logits from transformers itself); the
conversion runs once and is reused; bad paths are one-line errors; and the real embedded
default model converts and answers a factual question."""

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import pagedserve.executor.gguf_to_hf as gguf_to_hf
from pagedserve.executor.model_files import (
    DEFAULT_MODEL_NAME,
    ModelLoadError,
    embedded_gguf_path,
    resolve_model,
)
from pagedserve.testing.gguf_files import write_gguf
from pagedserve.testing.tiny_models import byte_level_tokenizer, tiny_llama_config

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def tiny_model(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(tiny_llama_config(len(byte_level_tokenizer()),
                                              tie_word_embeddings=tie, rope_theta=5000.0)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_float_gguf_converts_to_the_same_model(tmp_path, tie):
    source, tokenizer = tiny_model(tie), byte_level_tokenizer()
    write_gguf(source, tokenizer, tmp_path / "tiny.gguf")
    model = resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache")
    assert model.served_name == "tiny"
    assert model.architecture == "LlamaForCausalLM"

    converted = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], tensor, rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    ids = torch.tensor([[1, 70, 80, 90, 100, 5, 6, 7, 200, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits,
                                   rtol=1e-5, atol=1e-5)

    converted_tokenizer = AutoTokenizer.from_pretrained(model.path)
    text = "the cat in a hat, é 😀"
    assert converted_tokenizer(text).input_ids == tokenizer(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert (converted_tokenizer.apply_chat_template(messages, tokenize=False)
            == tokenizer.apply_chat_template(messages, tokenize=False))
    assert model.eos_token_ids() == [2]
    assert "tokenizer.json" in model.tokenizer_files()


def test_quantized_gguf_dequantizes_exactly(tmp_path):
    """--gguf-dequantize: transformers reads the float32 directory (the native form, which
    keeps the values quantized, is tests/test_gguf_native.py's)."""
    source = tiny_model(tie=True)
    write_gguf(source, byte_level_tokenizer(), tmp_path / "tiny.gguf", quant=Q8_0)
    converted = AutoModelForCausalLM.from_pretrained(
        resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache",
                      gguf_dequantize=True).path,
        dtype=torch.float32)
    for name, tensor in source.state_dict().items():
        expected = tensor.numpy()
        if expected.ndim == 2:  # what a Q8_0 reader must see: the quantized values
            expected = gguf.quants.dequantize(gguf.quants.quantize(expected, Q8_0), Q8_0)
        np.testing.assert_array_equal(converted.state_dict()[name].numpy(), expected, err_msg=name)
    assert not np.array_equal(expected, tensor.numpy())  # quantization did change the weights


def test_conversion_runs_once_then_the_cache_is_reused(tmp_path, monkeypatch):
    write_gguf(tiny_model(tie=True), byte_level_tokenizer(), tmp_path / "tiny.gguf")
    calls = []
    real_convert = gguf_to_hf.convert_gguf
    monkeypatch.setattr(gguf_to_hf, "convert_gguf",
                        lambda *a, **k: (calls.append(a), real_convert(*a, **k)))
    first = resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache")
    second = resolve_model(str(tmp_path / "tiny.gguf"), tmp_path / "cache")
    assert len(calls) == 1 and first.path == second.path
    assert first.path.parent == tmp_path / "cache" / "models"
    # No half-written staging directory is left behind.
    assert [p.name for p in first.path.parent.iterdir() if p.is_dir()] == [first.path.name]


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="'mamba' is not supported"):
        resolve_model(str(tmp_path / "x.gguf"), tmp_path / "cache")


def test_missing_and_unreadable_models_are_one_line_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        resolve_model(str(tmp_path), tmp_path)


def test_executor_with_a_missing_model_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "executor", "--model", str(tmp_path / "nope"),
         "--log-format", "json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"pagedserve executor: error: --model {tmp_path / 'nope'}: no such file" in result.stderr


@pytest.mark.slow
def test_embedded_default_model_converts_and_answers(default_model, default_model_float):
    """Both conversions: transformers answers on the float one, and the engine on the native
    one (its Q4_1 and Q8_0 weights kept) gives the same answer."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1.common_pb2 import SamplingParams

    assert embedded_gguf_path().is_file()
    model = default_model
    assert model.served_name == DEFAULT_MODEL_NAME
    assert model.config["num_hidden_layers"] == 30 and model.config["tie_word_embeddings"]
    assert model.config["quantization_config"] == {"quant_method": "gguf"}
    cache_dir = model.path.parent.parent
    assert resolve_model(None, cache_dir).path == model.path  # cached

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    hf_model = AutoModelForCausalLM.from_pretrained(default_model_float.path,
                                                    dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = hf_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    expected = out[0, prompt["input_ids"].shape[1]:].tolist()
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in answer
    with LLM(str(model.path), dtype="float32", kv_cache_gib=0.05, max_model_len=512) as llm:
        native = llm.generate([prompt["input_ids"][0].tolist()],
                              SamplingParams(max_tokens=len(expected), temperature=0))
    # transformers keeps the end-of-sequence token it stopped at; the engine's output ends before.
    assert native[0].outputs[0].token_ids == expected[:len(expected) - (
        expected[-1] in model.eos_token_ids())]
