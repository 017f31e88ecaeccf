"""Fuzzing the gateway's request handling (issue 9): hypothesis property tests of request parsing
and sampling-parameter validation, and schemathesis against the gateway's own OpenAPI spec.

The gateway runs in-process over a fake scheduler (a few deterministic tokens per sequence) and
the tiny model's real tokenizer, so every accepted request goes all the way through the real
formatting code. The limits below are the documented ones (README "Limits and security"),
written out here independently of the code that enforces them."""

import asyncio
import json
import math
from collections.abc import AsyncIterator

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from schemathesis.checks import positive_data_acceptance
from transformers import AutoTokenizer

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.grpc_api import chat_messages, sampling_param
from pagedserve.gateway.http_api import create_app
from pagedserve.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.gateway.prompts import check_sampling_rules
from pagedserve.gateway.scheduler_client import NO_DEADLINE, SchedulerClient, ServedModel
from pagedserve.v1 import common_pb2, generation_pb2, scheduler_pb2

MODEL = "tiny"
MAX_MODEL_LEN = 256
FAKE_TOKENS = 3  # tokens the fake scheduler generates per sequence, at most
MAX_LOGPROBS = 20  # the fake executor's --max-logprobs (the executor's default)
VOCAB = 300
# field -> (lowest, highest, lowest excluded): the documented ranges of the numeric fields.
RANGES = {
    "temperature": (0.0, math.inf, False), "top_p": (0.0, 1.0, True),
    "top_k": (-1, math.inf, False), "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False), "repetition_penalty": (0.0, math.inf, True),
    "n": (1, 64, False), "max_tokens": (1, math.inf, False), "min_tokens": (0, math.inf, False),
    "logprobs": (0, 20, False), "top_logprobs": (0, 20, False),
    "max_completion_tokens": (1, math.inf, False), "seed": (0, 2**64 - 1, False),
    "length_penalty": (-10.0, 10.0, False),
}
FUZZ_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


def in_range(field: str, value) -> bool:
    low, high, exclusive = RANGES[field]
    return (value > low if exclusive else value >= low) and value <= high


class FakeScheduler(SchedulerClient):
    """The scheduler as the gateway sees it, without one: one model, and FAKE_TOKENS tokens
    per sequence (fewer when max_tokens says so), the first with a vector when pooling is
    asked for."""

    def __init__(self, tokenizer):
        # No SchedulerClient.__init__: there is nothing to dial, and a grpc.aio channel would
        # need an event loop at construction.
        self.served = ServedModel(common_pb2.ModelInfo(
            model_id=MODEL, max_model_len=MAX_MODEL_LEN, vocab_size=len(tokenizer)), tokenizer,
            common_pb2.ExecutorLimits(max_logprobs=MAX_LOGPROBS))

    async def model(self, name: str = "") -> ServedModel:
        if name not in ("", MODEL):
            raise GatewayError(404, f"model: {name!r} is not served", "not_found_error", "model")
        return self.served

    async def generate(self, request: scheduler_pb2.SubmitRequest, deadline=NO_DEADLINE
                       ) -> AsyncIterator[scheduler_pb2.TokenDelta]:
        sampling = request.sampling
        count = min(FAKE_TOKENS, sampling.max_tokens if sampling.HasField("max_tokens")
                    else FAKE_TOKENS)
        for seq in range(max(1, sampling.n)):
            for i in range(count):
                token = 40 + (seq + i) % 50
                top = [common_pb2.TokenLogprob(token_id=t, logprob=-1.0, rank=r + 1)
                       for r, t in enumerate(range(5, 5 + sampling.logprobs))]
                logprobs = [common_pb2.PositionLogprobs(
                    chosen=common_pb2.TokenLogprob(token_id=token, logprob=-0.5), top=top)] \
                    if sampling.HasField("logprobs") else []
                yield scheduler_pb2.TokenDelta(
                    seq_index=seq, token_ids=[token], logprobs=logprobs,
                    num_prompt_tokens=len(request.prompt_token_ids) if seq == i == 0 else 0,
                    embedding=[0.6, 0.8] if seq == i == 0 and sampling.HasField("pooling")
                    else [],
                    finish_reason=common_pb2.FINISH_REASON_LENGTH if i == count - 1 else 0)
            await asyncio.sleep(0)

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        """Nothing to spare: the gateway ignores what a stopped sequence still sends. (The
        inherited one reads the dialled client's streams, which this fake never made: a stop
        string met by one of n >= 2 sequences was a 500, found by the fuzzer.)"""

    async def stats(self, timeout: float = 1.0) -> scheduler_pb2.SchedulerStats:
        return scheduler_pb2.SchedulerStats(executors=[scheduler_pb2.ExecutorStats(
            executor_id="fake", total_blocks=10, free_blocks=10)])


@pytest.fixture(scope="module")
def app(tiny_llama_dir):
    return create_app(FakeScheduler(AutoTokenizer.from_pretrained(tiny_llama_dir)))


@pytest.fixture(scope="module")
def http(app):
    return TestClient(app, raise_server_exceptions=False)


# -- bodies: mostly valid, with at most one field replaced by anything at all ---------------

JSON = st.recursive(st.none() | st.booleans() | st.integers()
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
EDGES = st.sampled_from([0, 1, -1, 0.0, 1.0, 2, -2, 20, 21, 64, 65, 2**64, -(2**63), 1e30, -1e-9])
ANYTHING = st.one_of(EDGES, st.integers(-5, 100), st.floats(-3, 3), JSON)
TEXT = st.text(max_size=30)
VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.1, 2),
    "n": st.integers(1, 4), "max_tokens": st.integers(1, 8), "min_tokens": st.integers(0, 3),
    "seed": st.integers(0, 2**32), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 200), max_size=3),
    "logit_bias": st.dictionaries(st.integers(0, 200).map(str), st.floats(-100, 100),
                                  max_size=3),
    "model": st.just(MODEL), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(), "disable_spec_decode": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "use_beam_search": st.booleans(), "length_penalty": st.floats(-2, 2),
}
COMPLETION = {
    "prompt": st.one_of(TEXT.filter(str.strip), st.lists(st.integers(0, 200), min_size=1,
                                                         max_size=6),
                        st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=2)),
    "logprobs": st.integers(0, 5), "echo": st.booleans()}
CHAT = {
    "messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
        min_size=1, max_size=3),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "max_completion_tokens": st.integers(1, 8)}


def bodies(own: dict, required: str) -> st.SearchStrategy[dict]:
    """A valid body, then maybe one field (the required one included) set to anything."""
    optional = {**VALID, **{k: v for k, v in own.items() if k != required}}
    valid = st.fixed_dictionaries({required: own[required]}, optional=optional)
    names = sorted({*optional, required, "no_such_field"})
    spoiled = st.dictionaries(st.sampled_from(names), ANYTHING, min_size=1, max_size=1)
    return st.tuples(valid, st.one_of(st.just({}), spoiled)).map(lambda t: {**t[0], **t[1]})


def sse_events(text: str) -> list[dict]:
    lines = [line for line in text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]", text
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def assert_error_names_a_field(reply, body: dict, required: str) -> None:
    assert reply.status_code in (400, 404), (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == \
        reply.status_code
    param = error["param"]
    assert param, error  # every refusal names the field at fault
    assert param.split(".")[0] in {*body, required}, (param, body)


def assert_accepted_values_in_range(body: dict) -> None:
    for field in RANGES.keys() & body.keys():
        value = body[field]
        if value is not None and not (field == "logprobs" and isinstance(value, bool)):
            assert isinstance(value, int | float) and in_range(field, value), (field, value)


def assert_completion(reply, body: dict, path: str) -> None:
    if body.get("stream") is True:
        events = sse_events(reply.text)
        assert all("error" not in e for e in events), events
        finished = [c for e in events for c in e["choices"] if c["finish_reason"]]
    else:
        finished = reply.json()["choices"]
        # A beam search asks the (fake) scheduler for one token per beam and step.
        per_choice = (body.get("max_tokens") or body.get("max_completion_tokens") or 16
                      if body.get("use_beam_search") is True else FAKE_TOKENS)
        assert reply.json()["usage"]["completion_tokens"] <= per_choice * len(finished)
    prompts = len(body["prompt"]) if path == "/v1/completions" and isinstance(
        body["prompt"], list) and isinstance(body["prompt"][0], list | str) else 1
    assert len(finished) == prompts * body.get("n", 1)
    assert all(c["finish_reason"] in ("stop", "length") for c in finished)


@pytest.mark.parametrize("path, own, required", [
    ("/v1/completions", COMPLETION, "prompt"), ("/v1/chat/completions", CHAT, "messages")])
def test_any_body_is_served_or_refused_naming_a_field(http, path, own, required):
    @FUZZ_SETTINGS
    @given(body=bodies(own, required))
    def check(body):
        reply = http.post(path, json=body)
        event(f"status {reply.status_code}")
        assert reply.status_code < 500, reply.text
        if reply.status_code == 200:
            assert_accepted_values_in_range(body)
            assert_completion(reply, body, path)
        else:
            assert_error_names_a_field(reply, body, required)
    check()


def test_a_stop_string_one_of_several_sequences_meets_is_served(http):
    """What the fuzzer found in CI (2026-12-07): the gateway tells the scheduler to stop a
    sequence whose stop string matched while its siblings go on; the fake then answered 500."""
    reply = http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": ""}], "n": 2, "stop": ["F"]})
    assert reply.status_code == 200, reply.text
    choices = reply.json()["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    assert choices[0]["finish_reason"] == "stop"
    assert "F" not in choices[0]["message"]["content"]


def sampling_messages() -> st.SearchStrategy[common_pb2.SamplingParams]:
    floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
    return st.builds(
        common_pb2.SamplingParams,
        temperature=floats, top_p=floats, top_k=st.integers(-5, 100),
        min_p=floats, repetition_penalty=floats, n=st.integers(0, 100),
        max_tokens=st.integers(0, 2**32 - 1), logprobs=st.integers(0, 40),
        stop=st.lists(st.text(max_size=300), max_size=20),
        logit_bias=st.dictionaries(st.integers(0, 2**31), floats, max_size=5))


@FUZZ_SETTINGS
@given(params=sampling_messages())
def test_the_sampling_rules_match_the_documented_limits(params):
    violations = {f"sampling.{name}" for name in ("temperature", "top_p", "top_k", "min_p",
                                                  "repetition_penalty", "max_tokens",
                                                  "logprobs")
                  if not in_range(name, getattr(params, name))}
    violations |= {"sampling.n"} if params.n > RANGES["n"][1] else set()
    if len(params.stop) > 16 or any(not 1 <= len(s) <= 256 for s in params.stop):
        violations.add("sampling.stop")
    if len(params.logit_bias) > 300 or any(abs(v) > 100 for v in params.logit_bias.values()) \
            or any(k >= VOCAB for k in params.logit_bias):
        violations.add("sampling.logit_bias")
    served = ServedModel(common_pb2.ModelInfo(vocab_size=VOCAB), None,
                         common_pb2.ExecutorLimits(max_logprobs=MAX_LOGPROBS))
    try:
        check_sampling_rules(served, params, sampling_param)
    except GatewayError as error:
        assert error.status == 400 and error.param in violations, (error.param, violations)
        assert error.param in error.message
    else:
        assert not violations, violations


@FUZZ_SETTINGS
@given(roles=st.lists(st.sampled_from(["system", "developer", "user", "assistant", "tool", "",
                                       "USER"]), max_size=3))
def test_grpc_chat_prompts_are_checked_before_the_template(roles):
    """Generate and Tokenize alike: an empty chat, an unknown role or a tool message that
    answers no call is a 400 naming the message's field (an empty chat once reached the
    template and failed with a 500)."""
    chat = generation_pb2.ChatPrompt(messages=[generation_pb2.ChatMessage(role=r, content="x")
                                               for r in roles])
    valid = bool(roles) and set(roles) <= {"system", "developer", "user", "assistant"}
    try:
        messages = chat_messages(chat)
    except GatewayError as error:
        assert not valid and error.status == 400 and error.param.startswith("chat.messages")
        assert error.param == "chat.messages" or roles[int(error.param.split(".")[2])] \
            not in ("system", "developer", "user", "assistant")
    else:
        assert valid and [m["role"] for m in messages] == [
            "system" if r == "developer" else r for r in roles]


@FUZZ_SETTINGS
@given(body=bodies(COMPLETION, "prompt"))
def test_what_http_parses_fits_the_contract(body):
    """The ranges are the shared rules' (checked after parsing, as for gRPC); what the HTTP
    models parse must fit the contract's fields, or building SamplingParams would raise."""
    try:
        request = CompletionRequest.model_validate(body)
    except ValueError:
        return
    request.sampling_params(request.max_tokens, request.logprobs)


@FUZZ_SETTINGS
@given(body=bodies(CHAT, "messages"))
def test_what_http_parses_for_chat_fits_the_contract(body):
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValueError:
        return
    request.sampling_params(request.max_output_tokens(), request.logprobs_count())


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(app, mode):
    """Every operation of /openapi.json with requests generated from the schema (positive:
    valid per schema; negative: invalid, which must be refused with a 4xx): no 5xx, and every
    answer's status, content type, headers and body conform to the spec. Not checked: that
    every schema-valid request is accepted (positive_data_acceptance): the schema cannot say
    "prompt or messages", the vocabulary or the context length, which answer a documented 400."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is schemathesis.GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to get wrong in a GET without parameters

        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])
        check()

