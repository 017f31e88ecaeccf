"""The OpenAI request models (gateway/openai_protocol.py) on their own: how a parsed body becomes
the contract's SamplingParams, which field a rule's error names, the prompts of a completion,
and vLLM's beam search extension (its parameters, and a 400 naming each field it cannot honour).

The expectations come from the OpenAI API reference and vLLM's documented semantics, written out
here: completions default to max_tokens 16 and `logprobs: 0` asks for the sampled token's
logprob; chat's `max_completion_tokens` replaces `max_tokens`, and its `logprobs` is a switch
whose count is `top_logprobs`; a completion's prompt is a string, strings, token ids or lists of
token ids; beam search keeps the n best beams (n is the beam width) over at most max_tokens
steps, greedily (temperature 0 or unset), and each step asks for 2n top logprobs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.runtime.beam_search import BeamSearchParams
from pagedserve.v1 import common_pb2

MSG = [{"role": "user", "content": "hi"}]
MAX_LOGPROBS = 20  # the executor's --max-logprobs default: beams of at most 10
S = common_pb2.SamplingParams


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "x", **fields})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MSG, **fields})


def refusal(call) -> GatewayError:
    with pytest.raises(GatewayError) as error:
        call()
    assert error.value.status == 400 and error.value.error_type == "invalid_request_error"
    assert error.value.message.startswith(f"{error.value.param}: "), error.value.message
    return error.value


# -- SamplingParams ---------------------------------------------------------------------

def test_every_sampling_field_reaches_the_contract():
    request = completion(
        min_tokens=2, top_k=5, min_p=0.125, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={"7": 1.5, "9": -2}, stop=["a", "bc"], stop_token_ids=[3, 4],
        ignore_eos=True, n=2, include_stop_str_in_output=True, skip_special_tokens=False,
        temperature=0.75, top_p=0.875, repetition_penalty=1.25, seed=42,
        disable_spec_decode=True)
    assert request.sampling_params(8, 3, 1) == S(
        max_tokens=8, min_tokens=2, temperature=0.75, top_p=0.875, top_k=5, min_p=0.125,
        repetition_penalty=1.25, presence_penalty=0.5, frequency_penalty=-0.25,
        logit_bias={7: 1.5, 9: -2.0}, seed=42, stop=["a", "bc"], stop_token_ids=[3, 4],
        ignore_eos=True, logprobs=3, prompt_logprobs=1, n=2, include_stop_str_in_output=True,
        skip_special_tokens=False, disable_spec_decode=True)


@pytest.mark.parametrize("make", [completion, chat])
def test_unset_fields_are_left_to_the_contract_s_defaults(make):
    """Unset optional fields stay unset (the executor's defaults: temperature 1, top_p 1, no
    seed, no logprobs); skip_special_tokens is true unless asked (vLLM's default)."""
    params = make().sampling_params(None, None)
    assert params == S(n=1, skip_special_tokens=True)
    assert not any(params.HasField(name) for name in (
        "max_tokens", "temperature", "top_p", "repetition_penalty", "seed", "logprobs",
        "prompt_logprobs"))


def test_zero_values_are_set_not_dropped():
    """temperature 0 is greedy, seed 0 a seed, logprobs 0 the sampled token's logprob only:
    each differs from leaving the field unset."""
    params = completion(temperature=0, seed=0, logprobs=0).sampling_params(0, 0, 0)
    assert params == S(max_tokens=0, temperature=0.0, seed=0, logprobs=0, prompt_logprobs=0,
                       n=1, skip_special_tokens=True)
    for name in ("max_tokens", "temperature", "seed", "logprobs", "prompt_logprobs"):
        assert params.HasField(name), name


@pytest.mark.parametrize("stop, strings", [
    ("ab", ["ab"]), (["ab", "c"], ["ab", "c"]), ([], []), (None, [])])
def test_stop_is_one_string_or_a_list(stop, strings):
    request = completion(stop=stop)
    assert request.stop_strings() == strings
    assert list(request.sampling_params(None, None).stop) == strings


# -- which field an error names ------------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "logprobs", "top_p", "n"])
def test_a_completion_error_names_the_sampling_field(field):
    assert completion(max_tokens=4).param(field) == field


@pytest.mark.parametrize("fields, field, param", [
    ({}, "logprobs", "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs", "top_logprobs"),
    ({"max_tokens": 4}, "max_tokens", "max_tokens"),
    ({}, "max_tokens", "max_tokens"),
    ({"max_completion_tokens": 4}, "max_tokens", "max_completion_tokens"),
    ({"max_completion_tokens": 0}, "max_tokens", "max_completion_tokens"),
    ({"max_completion_tokens": 4, "max_tokens": 5}, "max_tokens", "max_completion_tokens"),
    ({"max_completion_tokens": 4}, "min_tokens", "min_tokens"),
    ({}, "top_k", "top_k"),
])
def test_a_chat_error_names_the_field_the_client_sent(fields, field, param):
    assert chat(**fields).param(field) == param


@pytest.mark.parametrize("fields, max_tokens", [
    ({}, None), ({"max_tokens": 5}, 5), ({"max_completion_tokens": 7}, 7),
    ({"max_completion_tokens": 7, "max_tokens": 5}, 7),
    ({"max_completion_tokens": 0, "max_tokens": 5}, 0),  # refused by the rules, as sent
])
def test_chat_length_is_max_completion_tokens_over_max_tokens(fields, max_tokens):
    request = chat(**fields)
    assert request.max_output_tokens() == max_tokens
    params = request.sampling_params(request.max_output_tokens(), request.logprobs_count())
    assert params.HasField("max_tokens") == (max_tokens is not None)
    assert params.max_tokens == (max_tokens or 0)


@pytest.mark.parametrize("fields, count", [
    ({}, None), ({"logprobs": False}, None), ({"top_logprobs": 0}, None),
    ({"logprobs": True}, 0), ({"logprobs": True, "top_logprobs": 3}, 3)])
def test_chat_logprobs_is_a_switch_counted_by_top_logprobs(fields, count):
    assert chat(**fields).logprobs_count() == count


@pytest.mark.parametrize("fields, field", [
    ({"top_logprobs": 1}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": 1, "top_logprobs": 3}, "logprobs")])  # 1 is not a boolean: named first
def test_top_logprobs_needs_logprobs_true(fields, field):
    """OpenAI: logprobs must be true to use top_logprobs."""
    with pytest.raises(ValidationError) as error:
        chat(**fields)
    assert error.value.errors()[0]["loc"] == (field,)


# -- a completion's prompts ---------------------------------------------------------------

@pytest.mark.parametrize("prompt, prompts", [
    ("ab", ["ab"]),
    (["ab", "c"], ["ab", "c"]),
    ([5, 6], [[5, 6]]),
    ([[5, 6], [7]], [[5, 6], [7]]),
])
def test_a_completion_has_one_prompt_per_entry(prompt, prompts):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == prompts


# -- beam search --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [completion, chat])
@pytest.mark.parametrize("max_tokens", [None, 0])
def test_beam_search_needs_a_length(make, max_tokens):
    error = refusal(lambda: make(use_beam_search=True).beam_search_params(max_tokens,
                                                                          MAX_LOGPROBS))
    assert error.param == "use_beam_search"
    assert error.message == ("use_beam_search: needs max_tokens (or max_completion_tokens), "
                             "the length of the beams")


def test_beam_search_parameters_come_from_the_request():
    for make in (completion, chat):
        request = make(use_beam_search=True, n=3, ignore_eos=True, length_penalty=0.5)
        assert request.beam_search_params(7, MAX_LOGPROBS) == BeamSearchParams(
            beam_width=3, max_tokens=7, ignore_eos=True, length_penalty=0.5)
    assert completion(use_beam_search=True).beam_search_params(1, MAX_LOGPROBS) == \
        BeamSearchParams(beam_width=1, max_tokens=1, ignore_eos=False, length_penalty=1.0)


# Each field beam search does not honour, set to something but its default.
BEAM_REFUSED = [
    (completion, "stream", True), (completion, "top_p", 0.5), (chat, "top_k", 5),
    (completion, "min_p", 0.1), (chat, "presence_penalty", 0.5),
    (completion, "frequency_penalty", -0.5), (chat, "repetition_penalty", 1.1),
    (completion, "logit_bias", {"5": 1}), (completion, "seed", 0), (chat, "seed", 7),
    (completion, "stop", "x"), (chat, "stop", ["x"]), (completion, "stop_token_ids", [5]),
    (chat, "min_tokens", 1), (completion, "logprobs", 0), (chat, "logprobs", True),
    (chat, "top_logprobs", 0), (completion, "echo", True), (completion, "temperature", 0.5),
    (chat, "temperature", 1),
]


@pytest.mark.parametrize("make, field, value", BEAM_REFUSED)
def test_beam_search_refuses_what_it_cannot_honour_by_name(make, field, value):
    request = make(use_beam_search=True, **{field: value})
    error = refusal(lambda: request.beam_search_params(4, MAX_LOGPROBS))
    assert error.param == field
    assert error.message == f"{field}: not supported with use_beam_search"


@pytest.mark.parametrize("make, fields", [
    (completion, {"stream": False, "echo": False, "min_tokens": 0, "temperature": 0,
                  "logprobs": None, "seed": None, "stop": None}),
    (chat, {"logprobs": False, "temperature": 0.0, "top_logprobs": None, "top_k": None}),
    # fields beam search honours or that do not change sampling
    (completion, {"ignore_eos": True, "skip_special_tokens": False, "user": "u",
                  "include_stop_str_in_output": True, "priority": 0, "cache_salt": "s",
                  "disable_spec_decode": True}),
])
def test_beam_search_accepts_fields_at_their_default(make, fields):
    request = make(use_beam_search=True, n=2, **fields)
    assert request.beam_search_params(4, MAX_LOGPROBS).beam_width == 2


@pytest.mark.parametrize("fields, param", [
    ({"top_p": 0.5, "seed": 1, "stream": True}, "seed"),
    ({"top_k": 3, "temperature": 0.5}, "temperature"),
    ({"temperature": 0.5, "echo": True}, "echo"),
])
def test_beam_search_names_the_first_refused_field_alphabetically(fields, param):
    """One field per answer, the same for the same body (not a set's iteration order)."""
    request = completion(use_beam_search=True, **fields)
    assert refusal(lambda: request.beam_search_params(4, MAX_LOGPROBS)).param == param


@pytest.mark.parametrize("n, max_logprobs", [(11, 20), (3, 5), (2, 3)])
def test_beam_search_width_is_bounded_by_max_logprobs_and_named_n(n, max_logprobs):
    """Each step asks for 2n top logprobs: the beam width (n) is at most max_logprobs / 2."""
    request = chat(use_beam_search=True, n=n)
    error = refusal(lambda: request.beam_search_params(4, max_logprobs))
    assert error.param == "n"
    assert error.message.startswith(f"n: {n}, must be 1 to {max_logprobs // 2} ")
    assert request.model_copy(update={"n": n - 1}).beam_search_params(
        4, max_logprobs).beam_width == n - 1


def test_beam_search_names_a_negative_length_max_tokens():
    """A caller's length below 1 (the HTTP fields cannot send one: it is a uint32 and 0 is
    refused first) is still a 400 naming the field, not an error without one."""
    error = refusal(lambda: completion(use_beam_search=True).beam_search_params(
        -1, MAX_LOGPROBS))
    assert error.param == "max_tokens"
    assert error.message == "max_tokens: -1, must be at least 1"
