"""Our LLaMA for the flat paged batch against `transformers` on the same random weights:
one batch mixing prompts of different lengths, chunked prefill, and batched decode steps."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.executor.models import UnsupportedArchitectureError, load_model, model_class
from pagedserve.testing.paged_run import PagedRun, assert_matches_transformers

PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52)), list(range(60, 77))]


@pytest.mark.parametrize("chunk", [None, 5])
def test_prefill_then_decode_matches_transformers(tiny_llama_dir, chunk):
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert_matches_transformers(load_model(tiny_llama_dir, torch.float32), hf_model, PROMPTS,
                                chunk)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        model_class(["MambaForCausalLM"])


@pytest.mark.slow
def test_default_model_greedy_chat_matches_transformers(default_model, default_model_float):
    """The engine runs the GGUF's quantized weights natively; transformers runs their float32
    dequantization: the same function."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    hf_model = AutoModelForCausalLM.from_pretrained(default_model_float.path,
                                                    dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16,
                                     do_sample=False)[0, len(prompt):].tolist()

    run = PagedRun(load_model(default_model.path, torch.float32))
    table, tokens = [], list(prompt)
    logits = run.step([(table, tokens, 0)])[0]
    generated = []
    for _ in range(len(expected)):
        generated.append(int(logits.argmax()))
        logits = run.step([(table, [generated[-1]], len(tokens) + len(generated) - 1)])[0]
    assert generated == expected
