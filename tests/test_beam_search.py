"""Beam search in the offline engine (pagedserve/runtime/beam_search.py) against the same algorithm
run on transformers' logits: the same beams with the same cumulative logprobs; the beams share KV
blocks through the prefix cache; a beam that samples EOS completes and leaves the search; bad
parameters name the field."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.entrypoints.offline import LLM
from pagedserve.runtime.beam_search import BeamSearchParams
from pagedserve.testing.tiny_models import byte_level_tokenizer, save_tiny_model, tiny_llama_config

PROMPTS = [list(range(30, 70)), [7, 8, 9]]  # 40 tokens: whole blocks for the cache to share


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("beam-llama"), tiny_llama_config(301))
    byte_level_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(str(model_dir), dtype="float32", kv_cache_gib=0.05) as engine:
        yield engine


def reference_beams(model, prompt, width, steps):
    """(tokens, cumulative logprob) of the `width` best beams after `steps` tokens."""
    beams = [(list(prompt), 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, total in beams:
            with torch.no_grad():
                logprobs = model(torch.tensor([tokens])).logits[0, -1].log_softmax(-1)
            top = logprobs.topk(2 * width)
            candidates += [(tokens + [int(t)], total + float(lp))
                           for t, lp in zip(top.indices, top.values, strict=True)]
        beams = sorted(candidates, key=lambda c: c[1], reverse=True)[:width]
    return beams


def test_beams_match_the_algorithm_on_transformers(llm, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits_before = llm.blocks.stats.hit_tokens
    outputs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=5,
                                                        ignore_eos=True))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected = reference_beams(model, prompt, 3, 5)
        assert [b.tokens for b in output.sequences] == [tokens for tokens, _ in expected]
        assert [b.cum_logprob for b in output.sequences] == pytest.approx(
            [total for _, total in expected], abs=1e-4)
        assert all(b.output_tokens == b.tokens[len(prompt):] and len(b.logprobs) == 5
                   for b in output.sequences)
    # Every step after the first finds the 40-token prompt's blocks (2 of them) cached.
    assert llm.blocks.stats.hit_tokens - hits_before >= 4 * 3 * 32


def test_a_beam_that_samples_eos_completes(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    [first] = llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=2, max_tokens=1,
                                                             ignore_eos=True))
    eos = first.sequences[0].output_tokens[0]  # the best first token, made an EOS here
    saved, llm.eos_token_ids = llm.eos_token_ids, [eos]
    try:
        [output] = llm.beam_search([PROMPTS[0]], params)
    finally:
        llm.eos_token_ids = saved
    completed = [b for b in output.sequences if b.finished]
    assert [b.output_tokens for b in completed] == [[eos]]
    assert all(len(b.output_tokens) == 4 for b in output.sequences if not b.finished)


@pytest.mark.parametrize("params, message", [
    (BeamSearchParams(beam_width=0, max_tokens=4), "beam_width: 0, must be 1 to 10"),
    (BeamSearchParams(beam_width=11, max_tokens=4), "beam_width: 11"),
    (BeamSearchParams(beam_width=2, max_tokens=0), "max_tokens: 0"),
])
def test_bad_parameters_name_the_field(llm, params, message):
    with pytest.raises(ValueError, match=message):
        llm.beam_search([PROMPTS[1]], params)
