"""Our LLaMA for the flat paged batch against `transformers` on the same random weights:
one batch mixing prompts of different lengths, chunked prefill, and batched decode steps."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from executor_svc.models import UnsupportedArchitectureError, load_model, model_class
from tests.paged_run import PagedRun, reference_logits

PROMPTS = [[5], [7, 8, 9], list(range(20, 27)), list(range(40, 52)), list(range(60, 77))]


@pytest.mark.parametrize("chunk", [None, 5])
def test_prefill_then_decode_matches_transformers(tiny_llama_dir, chunk):
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    run = PagedRun(load_model(tiny_llama_dir, torch.float32))
    tables = [[] for _ in PROMPTS]

    # Prefill, whole or in chunks of `chunk` tokens; every prompt shares each step.
    done = [0] * len(PROMPTS)
    logits = [None] * len(PROMPTS)
    while any(d < len(p) for d, p in zip(done, PROMPTS, strict=True)):
        active = [i for i, p in enumerate(PROMPTS) if done[i] < len(p)]
        # decodes-first ordering: sequences with one token left go to the front
        active.sort(key=lambda i: min(chunk or 10**9, len(PROMPTS[i]) - done[i]) != 1)
        work = []
        for i in active:
            n = min(chunk or 10**9, len(PROMPTS[i]) - done[i])
            work.append((tables[i], PROMPTS[i][done[i]:done[i] + n], done[i]))
        out = run.step(work)
        for row, i in enumerate(active):
            done[i] += len(work[row][1])
            logits[i] = out[row]
    sequences = [list(p) for p in PROMPTS]
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i], reference_logits(hf_model, p), rtol=1e-4, atol=1e-4)

    # Batched greedy decode steps.
    for _ in range(6):
        for i, seq in enumerate(sequences):
            seq.append(int(logits[i].argmax()))
        out = run.step([(tables[i], [seq[-1]], len(seq) - 1) for i, seq in enumerate(sequences)])
        for i, seq in enumerate(sequences):
            logits[i] = out[i]
            torch.testing.assert_close(out[i], reference_logits(hf_model, seq),
                                       rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM"):
        model_class(["MambaForCausalLM"])


@pytest.mark.slow
def test_default_model_greedy_chat_matches_transformers(default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True)
    if not isinstance(prompt, list):
        prompt = prompt["input_ids"]
    hf_model = AutoModelForCausalLM.from_pretrained(default_model.path,
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
