"""The shared request rules (pagedserve/runtime/request_rules.py), each at its boundary: at the
limit accepted, just past it refused with the exact message clients read ("field: rule"). The
same limits through a real stack, HTTP and gRPC: tests/test_limits.py; against the README's
table: README "Limits and security"."""

from __future__ import annotations

import math

import pytest

from pagedserve.runtime.request_rules import (
    MAX_CACHE_SALT_CHARS,
    MAX_PRIORITY,
    RuleError,
    SamplingLimits,
    check_cache_salt,
    check_priority,
    check_request_id,
    check_sampling,
)
from pagedserve.v1 import common_pb2

S = common_pb2.SamplingParams
LIMITS = SamplingLimits(vocab_size=100, max_logprobs=5, max_n=8)
PENALTY = "must be in [-2, 2]"
STOP = "at most 16 stop strings of 1 to 256 characters"

# (accepted at the limit, refused just past it, the message)
SAMPLING_BOUNDARIES = [
    (S(max_tokens=1), S(max_tokens=0), "max_tokens: must be >= 1"),
    (S(max_tokens=3, min_tokens=3), S(max_tokens=3, min_tokens=4),
     "min_tokens: must be <= max_tokens"),
    (S(temperature=0.0), S(temperature=-1e-6), "temperature: must be a finite number >= 0"),
    (S(temperature=1e30), S(temperature=math.inf), "temperature: must be a finite number >= 0"),
    (S(top_p=1.0), S(top_p=1.0001), "top_p: must be in (0, 1]"),
    (S(top_p=1e-6), S(top_p=0.0), "top_p: must be in (0, 1]"),
    (S(top_k=-1), S(top_k=-2), "top_k: must be >= -1 (0 or -1: disabled)"),
    (S(min_p=1.0), S(min_p=1.0001), "min_p: must be in [0, 1]"),
    (S(min_p=0.0), S(min_p=-1e-6), "min_p: must be in [0, 1]"),
    (S(repetition_penalty=1e-6), S(repetition_penalty=0.0),
     "repetition_penalty: must be a finite number > 0"),
    (S(presence_penalty=2.0), S(presence_penalty=2.0001), f"presence_penalty: {PENALTY}"),
    (S(presence_penalty=-2.0), S(presence_penalty=-2.0001), f"presence_penalty: {PENALTY}"),
    (S(frequency_penalty=2.0), S(frequency_penalty=2.0001), f"frequency_penalty: {PENALTY}"),
    (S(frequency_penalty=-2.0), S(frequency_penalty=-2.0001), f"frequency_penalty: {PENALTY}"),
    (S(logit_bias={i: 1.0 for i in range(100)}), S(logit_bias={100: 1.0}),
     "logit_bias: keys must be token ids below the vocabulary size 100"),
    (S(logit_bias={5: 100.0, 6: -100.0}), S(logit_bias={5: 100.01}),
     "logit_bias: values must be in [-100, 100]"),
    (S(logit_bias={5: -100.0}), S(logit_bias={5: -100.01}),
     "logit_bias: values must be in [-100, 100]"),
    (S(stop=["x"] * 16), S(stop=["x"] * 17), f"stop: {STOP}"),
    (S(stop=["x" * 256]), S(stop=["x" * 257]), f"stop: {STOP}"),
    (S(stop=["x"]), S(stop=[""]), f"stop: {STOP}"),
    (S(stop_token_ids=[1] * 64), S(stop_token_ids=[1] * 65),
     "stop_token_ids: at most 64 token ids"),
    (S(stop_token_ids=[99]), S(stop_token_ids=[100]),
     "stop_token_ids: token ids must be below the vocabulary size 100"),
    (S(logprobs=5), S(logprobs=6), "logprobs: must be <= 5 (the executor's --max-logprobs)"),
    (S(prompt_logprobs=5), S(prompt_logprobs=6),
     "prompt_logprobs: must be <= 5 (the executor's --max-logprobs)"),
    (S(n=8), S(n=9), "n: must be <= 8"),
]


@pytest.mark.parametrize("at_limit, past_limit, message", SAMPLING_BOUNDARIES)
def test_each_sampling_rule_holds_exactly_at_its_boundary(at_limit, past_limit, message):
    check_sampling(at_limit, LIMITS)
    with pytest.raises(RuleError) as error:
        check_sampling(past_limit, LIMITS)
    assert str(error.value) == message
    assert f"{error.value.field}: {error.value.rule}" == message


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty",
                                   "presence_penalty", "frequency_penalty"])
def test_nan_is_never_accepted(field):
    with pytest.raises(RuleError) as error:
        check_sampling(S(**{field: math.nan}), LIMITS)
    assert error.value.field == field


def test_more_than_300_logit_bias_entries_are_refused_before_their_keys_are_read():
    big = SamplingLimits(vocab_size=1000, max_logprobs=5)
    check_sampling(S(logit_bias={i: 1.0 for i in range(300)}), big)
    with pytest.raises(RuleError, match=r"^logit_bias: at most 300 entries$"):
        check_sampling(S(logit_bias={i: 1.0 for i in range(301)}), big)


def test_unset_fields_take_their_defaults():
    """Unset optional fields are not zeros: no max_tokens is no limit, temperature and top_p
    default to 1, repetition_penalty to 1, and no logprobs asked is none, which an executor
    started with --max-logprobs 0 serves."""
    check_sampling(S(min_tokens=50), LIMITS)
    check_sampling(S(), LIMITS)
    no_logprobs = SamplingLimits(vocab_size=100, max_logprobs=0)
    check_sampling(S(logprobs=0, prompt_logprobs=0), no_logprobs)
    check_sampling(S(), no_logprobs)


def test_priority_bounds():
    for priority in (-MAX_PRIORITY, 0, MAX_PRIORITY):
        check_priority(priority)
    for priority in (-MAX_PRIORITY - 1, MAX_PRIORITY + 1):
        with pytest.raises(RuleError) as error:
            check_priority(priority)
        assert str(error.value) == "priority: must be in [-1000, 1000]"


def test_request_id_characters_and_length():
    for request_id in ("a", "A-z.0_9:x", "r" * 128):
        check_request_id(request_id)
    for request_id in ("", "r" * 129, "a/0", "a b", "é"):
        with pytest.raises(RuleError) as error:
            check_request_id(request_id)
        assert str(error.value) == \
            "request_id: must be 1 to 128 characters of A-Z a-z 0-9 . _ : -", request_id


def test_cache_salt_length():
    check_cache_salt("s" * MAX_CACHE_SALT_CHARS)
    with pytest.raises(RuleError) as error:
        check_cache_salt("s" * (MAX_CACHE_SALT_CHARS + 1))
    assert str(error.value) == "cache_salt: at most 256 characters"
