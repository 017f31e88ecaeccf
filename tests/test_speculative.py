"""Speculative decoding's pieces that stand alone (executor/speculative.py): the configuration
as vLLM's `--speculative-config` takes it, the n-gram proposer against a brute-force search of
every suffix, and the acceptance of proposals."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.executor.speculative import (
    SpeculativeConfig,
    SpeculativeConfigError,
    accepted_length,
    parse_speculative_config,
    propose_ngram,
)


def brute_force_ngram(tokens: list[int], k: int, low: int, high: int) -> list[int]:
    """Prompt lookup by its definition: for n from high down to low, the latest earlier
    occurrence of the last n tokens that has a token after it."""
    for n in range(high, low - 1, -1):
        if len(tokens) < n + 1:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


@settings(max_examples=400, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=40), k=st.integers(1, 6),
       low=st.integers(1, 4), extra=st.integers(0, 3))
def test_the_proposer_finds_what_a_search_of_every_suffix_finds(tokens, k, low, extra):
    high = low + extra
    proposed = propose_ngram(np.array(tokens, dtype=np.int64), k, low, high)
    assert proposed.tolist() == brute_force_ngram(tokens, k, low, high)


def test_the_proposer_copies_what_followed_the_latest_longest_match():
    tokens = [7, 1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    # 1 2 3 occurs at 1 and 6: the latest (6) is followed by 4 5 1 ...
    assert propose_ngram(np.array(tokens), 3, 2, 3).tolist() == [4, 5, 1]
    assert propose_ngram(np.array(tokens), 3, 4, 5).tolist() == []  # 9 1 2 3 / 5 1 2 3 differ
    assert propose_ngram(np.array([5, 6]), 3, 1, 1).tolist() == []


@pytest.mark.parametrize("drafts, sampled, expected", [
    ([4, 5, 6], [4, 5, 6, 7], 3),  # all confirmed, then the bonus token
    ([4, 5, 6], [4, 9, 6, 7], 1),  # the second differs: the target's draw replaces it
    ([4, 5, 6], [8, 5, 6, 7], 0),
    ([], [3], 0),
])
def test_proposals_are_kept_while_the_targets_draws_agree(drafts, sampled, expected):
    assert accepted_length(drafts, sampled) == expected


def test_the_config_takes_vllms_keys_and_defaults():
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4}') == \
        SpeculativeConfig("ngram", 4, 5, 5, None)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "prompt_lookup_max": 4, "disable_by_batch_size": 32}) == \
        SpeculativeConfig("ngram", 3, 4, 4, 32)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "prompt_lookup_min": 2, "prompt_lookup_max": 4}) == \
        SpeculativeConfig("ngram", 3, 2, 4, None)
    # A model and no method: a draft model, as in vLLM.
    assert parse_speculative_config({"model": "/m", "num_speculative_tokens": 2}) == \
        SpeculativeConfig("draft_model", 2, model="/m")
    assert parse_speculative_config({"method": "draft_model", "model": "/m",
                                     "num_speculative_tokens": 2,
                                     "disable_by_batch_size": 8}) == \
        SpeculativeConfig("draft_model", 2, disable_by_batch_size=8, model="/m")


@pytest.mark.parametrize("text, named", [
    ("{", "not JSON"),
    ("[1]", "must be a JSON object"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle' is not supported"),
    ('{"method": "ngram"}', "num_speculative_tokens must be a positive integer, got None"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "num_speculative_tokens": 17}', "num_speculative_tokens 17 exceeds"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, '
     '"prompt_lookup_max": 2}', "prompt_lookup_min 4 exceeds prompt_lookup_max 2"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}',
     "unsupported key\\(s\\) draft_tensor_parallel_size"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "model: method 'draft_model' "
     "needs the draft's local directory"),
    ('{"model": "", "num_speculative_tokens": 2}', "model: method 'draft_model' needs"),
    ('{"model": "/m", "num_speculative_tokens": 2, "prompt_lookup_max": 3}',
     "prompt_lookup_max does not apply to method 'draft_model'"),
    ('{"method": "ngram", "model": "/m", "num_speculative_tokens": 2}',
     "model does not apply to method 'ngram'"),
])
def test_a_bad_config_is_refused_naming_the_key(text, named):
    with pytest.raises(SpeculativeConfigError, match=named):
        parse_speculative_config(text)


# -- the engine end to end (offline: the scheduler and an executor in one process) ----------

REPEATING = [5, 6, 7, 8, 9] * 3 + [5, 6]
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
               "prompt_lookup_max": 3}


def generate(model_dir, prompts, params, overlap=True, **engine):
    from pagedserve.entrypoints.offline import LLM

    with LLM(str(model_dir), dtype="float32", kv_cache_gib=0.01, max_model_len=128,
             overlap=overlap, **engine) as llm:
        outputs = llm.generate(prompts, params)
        counters, blocks = llm.scheduler.counters, llm.blocks
        assert blocks.num_used_blocks == 0  # every block back, lookahead slots included
        return [[(o.token_ids, o.finish_reason) for o in out.outputs] for out in outputs], \
            counters


def speculation(method: str, model_dir) -> dict:
    """Each method's config: prompt lookup, or the model as its own draft."""
    if method == "ngram":
        return SPECULATIVE
    return {"model": str(model_dir), "num_speculative_tokens": 3}


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_the_engine_speculates_and_gives_the_tokens_it_gives_without(tiny_llama_dir, overlap,
                                                                     method):
    """Greedy, seeded and n > 1 requests, with stop tokens and max_tokens in the middle of a
    run of accepted proposals: the same tokens and finish reasons as without speculation, in
    fewer steps, and no block left behind."""
    from pagedserve.v1 import common_pb2

    prompts = [REPEATING, REPEATING[3:], [11, 12, 11, 12, 11], list(range(20, 30))]
    params = [common_pb2.SamplingParams(max_tokens=40, temperature=0.0),
              common_pb2.SamplingParams(max_tokens=37, temperature=0.1, seed=5, n=2),
              common_pb2.SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[9]),
              common_pb2.SamplingParams(max_tokens=23, temperature=0.0)]
    plain, plain_counters = generate(tiny_llama_dir, prompts, params, overlap)
    spec, counters = generate(tiny_llama_dir, prompts, params, overlap,
                              speculative_config=speculation(method, tiny_llama_dir))
    assert spec == plain
    assert counters.speculative_decodes > 0 and counters.draft_tokens > 0
    assert 0 < counters.accepted_tokens <= counters.draft_tokens
    assert counters.steps < plain_counters.steps


FAMILIES = ("mistral", "qwen2", "gpt_neox", "falcon")


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    """A tiny random model of each family beside LLaMA, with the tiny models' tokenizer."""
    from pagedserve.testing import tiny_models

    tokenizer = tiny_models.byte_level_tokenizer()
    config = getattr(tiny_models, f"tiny_{request.param}_config")(len(tokenizer))
    directory = tiny_models.save_tiny_model(tmp_path_factory.mktemp(request.param), config)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_every_family_speculates_and_gives_the_tokens_it_gives_without(family_dir, method):
    """Greedy and seeded n > 1 requests through the engine: the same tokens with either
    method, proposals accepted."""
    from pagedserve.v1 import common_pb2

    prompts = [REPEATING, list(range(30, 45))]
    params = [common_pb2.SamplingParams(max_tokens=32, temperature=0.0),
              common_pb2.SamplingParams(max_tokens=32, temperature=0.8, seed=3, n=2)]
    plain, _ = generate(family_dir, prompts, params)
    spec, counters = generate(family_dir, prompts, params,
                              speculative_config=speculation(method, family_dir))
    assert spec == plain
    assert counters.accepted_tokens > 0


def test_requests_that_turn_speculation_off_verify_nothing(tiny_llama_dir):
    """disable_spec_decode on each request: no step of theirs verifies a proposal, the draft
    model (which still keeps its cache up to date) proposes nothing, and the tokens are the
    same."""
    from pagedserve.v1 import common_pb2

    params = common_pb2.SamplingParams(max_tokens=24, temperature=0.0)
    off = common_pb2.SamplingParams(max_tokens=24, temperature=0.0, disable_spec_decode=True)
    plain, _ = generate(tiny_llama_dir, [REPEATING] * 2, params)
    spec, counters = generate(tiny_llama_dir, [REPEATING] * 2, off,
                              speculative_config=speculation("draft_model", tiny_llama_dir))
    assert spec == plain
    assert counters.speculative_decodes == counters.draft_tokens == 0


def test_a_bad_speculative_config_stops_the_start_naming_the_key(tiny_llama_dir):
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError

    with pytest.raises(StartupError, match="num_speculative_tokens must be a positive"):
        LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01,
            speculative_config={"method": "ngram", "num_speculative_tokens": 0})


def other_tokenizer(directory):
    """A tokenizer like the tiny models' with two tokens' ids swapped."""
    import json

    from pagedserve.testing.tiny_models import byte_level_tokenizer

    byte_level_tokenizer().save_pretrained(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (directory / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case, error", [
    ("missing", "--speculative-config.model .*/missing: no such file or directory"),
    ("short", "its context length 64 is shorter than --max-model-len 128"),
    ("tokenizer", "its tokenizer's vocabulary differs from"),
])
def test_a_draft_that_cannot_stand_in_for_the_model_is_refused_naming_it(
        tiny_llama_dir, tmp_path, case, error):
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.runtime.serving import StartupError
    from pagedserve.testing.tiny_models import save_tiny_llama

    draft = tmp_path / case
    if case == "short":
        save_tiny_llama(draft, max_position_embeddings=64)
    elif case == "tokenizer":
        save_tiny_llama(draft)
        other_tokenizer(draft)
    with pytest.raises(StartupError, match=error):
        LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01, max_model_len=128,
            speculative_config={"model": str(draft), "num_speculative_tokens": 2})


def test_a_draft_models_blocks_hold_both_caches(tiny_llama_dir, tmp_path):
    """The same memory holds fewer blocks with a draft: each block holds the draft's K/V too;
    the executor describes the sum, and the weights of both."""
    from pagedserve.executor.bootstrap import build_runner, describe
    from pagedserve.executor.config import EngineConfig
    from pagedserve.executor.model_files import resolve_model
    from pagedserve.testing.tiny_models import save_tiny_llama

    draft = save_tiny_llama(tmp_path / "draft", num_hidden_layers=1)
    model_dir = resolve_model(str(tiny_llama_dir), tmp_path)
    alone, paired = (describe("e", model_dir, build_runner(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01,
        speculative_config=config), model_dir))
        for config in (None, f'{{"model": "{draft}", "num_speculative_tokens": 2}}'))
    # The draft has 1 of the model's 2 layers: a block costs 1.5x.
    assert paired.kv_cache.bytes_per_block == alone.kv_cache.bytes_per_block * 3 // 2
    assert paired.kv_cache.num_blocks == alone.kv_cache.num_blocks * 2 // 3
    assert paired.model.weight_bytes > alone.model.weight_bytes


def test_sampled_tokens_follow_the_distribution_they_follow_without_speculation(
        tiny_llama_dir):
    """Temperature > 0 (0.1: the tiny random model then falls into loops that prompt lookup
    predicts, and still samples: no two of the outputs below are alike). Seeded: 64 seeds give
    the same tokens with speculation as without (each position's draw depends only on the seed
    and the position), so the distributions are the same. Unseeded: at each of 24 positions,
    the tokens of 400 samples with speculation stay within sampling noise of 400 without
    (total variation distance; the global generator is seeded, so the test is deterministic)."""
    import torch

    from pagedserve.v1 import common_pb2

    seeded = [common_pb2.SamplingParams(temperature=0.1, seed=s, max_tokens=24)
              for s in range(64)]
    plain, _ = generate(tiny_llama_dir, [REPEATING] * 64, seeded)
    spec, counters = generate(tiny_llama_dir, [REPEATING] * 64, seeded,
                              speculative_config=SPECULATIVE)
    assert spec == plain and counters.accepted_tokens > 100

    unseeded = common_pb2.SamplingParams(temperature=0.1, max_tokens=24)
    runs = []
    for config, seed in ((None, 0), (None, 1), (SPECULATIVE, 0)):
        torch.manual_seed(seed)
        outputs, counters = generate(tiny_llama_dir, [REPEATING] * 400, unseeded,
                                     speculative_config=config)
        # Ended sequences (EOS) count as a token of their own, 300, at the positions left.
        runs.append(torch.tensor([tokens + [300] * (24 - len(tokens))
                                  for [(tokens, _)] in outputs]))
        assert config is None or counters.accepted_tokens > 1000

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        """Total variation distance of the tokens at each position, averaged."""
        return sum(float((torch.bincount(a[:, p], minlength=301)
                          - torch.bincount(b[:, p], minlength=301)).abs().sum()) / 2 / len(a)
                   for p in range(24)) / 24

    plain, other_plain, spec = runs
    noise = distance(plain, other_plain)  # two samples without speculation: 0.26 measured
    # Measured 0.27 with speculation; accepting every proposal instead gives 0.35.
    assert distance(spec, other_plain) < noise + 0.04


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_two_tensor_parallel_ranks_speculate_as_one(tiny_llama_dir, method):
    """Every rank proposes from its own mirror of the same tokens (n-gram), or rank 0's draft
    model proposes for all, so the ranks run the same verification batch: two ranks give one
    rank's greedy tokens, with and without speculation."""
    from pagedserve.v1 import common_pb2

    params = common_pb2.SamplingParams(max_tokens=32, temperature=0.0)
    single, _ = generate(tiny_llama_dir, [REPEATING, REPEATING[4:]], params)
    split, counters = generate(tiny_llama_dir, [REPEATING, REPEATING[4:]], params,
                               tensor_parallel_size=2,
                               speculative_config=speculation(method, tiny_llama_dir))
    assert split == single and counters.accepted_tokens > 0
