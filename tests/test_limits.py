"""Every limit of README.md's "Limits and security" table at its boundary, through the processes
users run (issue 18, "the deployed shape is what gets tested"): one `pagedserve up` stack on
the tiny model with non-default limits (--max-num-seqs 8, --max-logprobs 3, --max-model-len 64,
a KV pool of exactly one context, --allow-client-priority). Exactly at a limit a request is
served (HTTP 200 / gRPC OK); one past it is refused at once (HTTP 4xx in OpenAI's error shape
whose `param` names the field / gRPC INVALID_ARGUMENT with the field in the details), over the
HTTP completions and chat APIs and the gRPC Generation API wherever the field exists.

The tables below mirror the README's, row for row. Two rows are the bugs this file was written
for: a request over the executor's --max-logprobs passed the gateway and cost the executor all
its requests, and gRPC took presence / frequency penalties of 1e6. Where a limit cannot be
reached on its own, the test says which rule fires on each side of it (the prompt's character
cap, logit_bias's 300 entries, the KV pool). n sequences that could never share the pool are
refused at once too (they used to wait for their timeout)."""

from __future__ import annotations

import http.client
import json
import math
import pathlib
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from pagedserve.gateway.http_api import MAX_BODY_BYTES
from pagedserve.runtime.serving import MAX_MESSAGE_BYTES
from pagedserve.testing.processes import RunningStack, post_json, running_stack
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow

MAX_NUM_SEQS = 8  # below the fixed n cap of 64, so it is the limit here
MAX_LOGPROBS = 3
MAX_MODEL_LEN = 64
BLOCK_SIZE = 4
# The smallest pool the executor starts with: one sequence of MAX_MODEL_LEN tokens.
POOL_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE
VOCAB = 264  # the tiny model's (checked against the stack's ListModels)
CHARS_PER_TOKEN = 32  # the gateway's character cap per token of the context
FAST_S = 1.0  # "at once"

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BOTH = (CMPL, CHAT)
API = {CMPL: "completions", CHAT: "chat"}
S = common_pb2.SamplingParams
NAN = math.nan


def kv_cache_gib(model_dir: pathlib.Path) -> float:
    """A --kv-cache-gib that holds POOL_BLOCKS blocks of the model's float32 K and V (and half a
    block more, which is no block)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_block = (2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
                 * 4 * BLOCK_SIZE)
    return (POOL_BLOCKS + 0.5) * per_block / 2**30


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("limits") / "log", "--model", str(tiny_llama_dir),
                       "--dtype", "float32", "--block-size", str(BLOCK_SIZE),
                       "--kv-cache-gib", repr(kv_cache_gib(tiny_llama_dir)),
                       "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                       "--max-logprobs", str(MAX_LOGPROBS), "--allow-client-priority") as stack:
        (executor,) = stack.stats().executors
        assert executor.total_blocks == POOL_BLOCKS, executor
        with grpc.insecure_channel(stack.grpc) as channel:
            (model,) = generation_pb2_grpc.GenerationStub(channel).ListModels(
                generation_pb2.ListModelsRequest(), timeout=30).models
        assert (model.vocab_size, model.max_model_len) == (VOCAB, MAX_MODEL_LEN), model
        stack.executor_id = executor.executor_id
        yield stack


@pytest.fixture(scope="module")
def stub(stack) -> Iterator[generation_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(stack.grpc) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


# -- HTTP ----------------------------------------------------------------------------------

def post(stack: str, path: str, body: dict | bytes) -> tuple[int, dict, float]:
    """(status, JSON reply, seconds). NaN travels as JSON's common NaN literal."""
    return post_json(f"{stack}{path}",
                     body if isinstance(body, bytes) else json.dumps(body).encode())


def http_body(path: str, fields: dict) -> dict:
    """A request of one short prompt and one output token, with `fields`."""
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "x"}
    return {**prompt, "max_tokens": 1, **fields}


def assert_served(status: int, reply: dict, choices: int = 1) -> None:
    assert status == 200, reply
    assert len(reply["choices"]) == choices, reply


def assert_refused(status: int, reply: dict, elapsed: float, param: str,
                   says: str | None = None) -> None:
    """A fast 400 in OpenAI's error shape naming `param` (and saying `says`)."""
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
    error = reply["error"]
    assert error["param"] == param and param in error["message"], reply
    assert error["type"] == "invalid_request_error" and error["code"] == 400, reply
    if says is not None:
        assert says in error["message"], reply
    assert elapsed < FAST_S, f"refused after {elapsed:.2f} s"


def chat_of(content: str) -> dict:
    return {"messages": [{"role": "user", "content": content}]}


def token_prompt(n: int) -> list[int]:
    """A token-id prompt of n tokens."""
    return [5] * n


# (id, paths, fields at the limit, fields one past it, the field named)
HTTP_ROWS: list[tuple[str, tuple[str, ...], dict, dict, str]] = [
    # n: 1-64 and at most --max-num-seqs (8 here; the fixed 64 is checked in process by
    # tests/test_request_surface.py::test_n_up_to_the_fixed_cap_is_accepted_over_both_apis)
    ("n", BOTH, {"n": MAX_NUM_SEQS}, {"n": MAX_NUM_SEQS + 1}, "n"),
    ("n-at-least-1", BOTH, {"n": 1}, {"n": 0}, "n"),
    # logprobs / top_logprobs: 0 to the executor's --max-logprobs (bug: passed the gateway)
    ("logprobs", (CMPL,), {"logprobs": MAX_LOGPROBS}, {"logprobs": MAX_LOGPROBS + 1},
     "logprobs"),
    ("top_logprobs", (CHAT,), {"logprobs": True, "top_logprobs": MAX_LOGPROBS},
     {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    # stop: at most 16 strings of 1-256 characters
    ("stop-count", BOTH, {"stop": ["s"] * 16}, {"stop": ["s"] * 17}, "stop"),
    ("stop-chars", BOTH, {"stop": ["s" * 256]}, {"stop": ["s" * 257]}, "stop"),
    ("stop-chars-str", (CMPL,), {"stop": "s" * 256}, {"stop": "s" * 257}, "stop"),
    ("stop-empty", BOTH, {"stop": ["s"]}, {"stop": [""]}, "stop"),
    # logit_bias: values in [-100, 100], keys in the vocabulary (300 entries: HTTP_WHICH_RULE)
    ("logit_bias-value", BOTH, {"logit_bias": {"5": 100}}, {"logit_bias": {"5": 100.001}},
     "logit_bias"),
    ("logit_bias-value-negative", BOTH, {"logit_bias": {"5": -100}},
     {"logit_bias": {"5": -100.001}}, "logit_bias"),
    ("logit_bias-key", BOTH, {"logit_bias": {str(VOCAB - 1): 1}},
     {"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
    ("logit_bias-whole-vocab", BOTH, {"logit_bias": {str(i): 0 for i in range(VOCAB)}},
     {"logit_bias": {str(i): 0 for i in range(301)}}, "logit_bias"),
    # stop_token_ids: at most 64, in the vocabulary
    ("stop_token_ids-count", BOTH, {"stop_token_ids": [5] * 64},
     {"stop_token_ids": [5] * 65}, "stop_token_ids"),
    ("stop_token_ids-id", BOTH, {"stop_token_ids": [VOCAB - 1]},
     {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    # token-id prompts: ids in the vocabulary
    ("token-id-prompt", (CMPL,), {"prompt": [VOCAB - 1]}, {"prompt": [VOCAB]}, "prompt"),
    ("token-id-prompts", (CMPL,), {"prompt": [[1], [VOCAB - 1]]}, {"prompt": [[1], [VOCAB]]},
     "prompt"),
    # sampling values
    ("temperature", BOTH, {"temperature": 0}, {"temperature": -1e-6}, "temperature"),
    ("temperature-nan", BOTH, {"temperature": 1.5}, {"temperature": NAN}, "temperature"),
    ("temperature-inf", BOTH, {"temperature": 1e30}, {"temperature": math.inf},
     "temperature"),
    ("top_p", BOTH, {"top_p": 1}, {"top_p": 1.000001}, "top_p"),
    ("top_p-above-0", BOTH, {"top_p": 1e-6}, {"top_p": 0}, "top_p"),
    ("top_p-nan", BOTH, {"top_p": 0.5}, {"top_p": NAN}, "top_p"),
    ("top_k", BOTH, {"top_k": -1}, {"top_k": -2}, "top_k"),
    ("min_p", BOTH, {"min_p": 1}, {"min_p": 1.000001}, "min_p"),
    ("min_p-negative", BOTH, {"min_p": 0}, {"min_p": -1e-6}, "min_p"),
    ("presence_penalty", BOTH, {"presence_penalty": 2}, {"presence_penalty": 2.000001},
     "presence_penalty"),
    ("presence_penalty-negative", BOTH, {"presence_penalty": -2},
     {"presence_penalty": -2.000001}, "presence_penalty"),
    ("frequency_penalty", BOTH, {"frequency_penalty": 2}, {"frequency_penalty": 2.000001},
     "frequency_penalty"),
    ("frequency_penalty-negative", BOTH, {"frequency_penalty": -2},
     {"frequency_penalty": -2.000001}, "frequency_penalty"),
    ("frequency_penalty-nan", BOTH, {"frequency_penalty": 0}, {"frequency_penalty": NAN},
     "frequency_penalty"),
    ("repetition_penalty", BOTH, {"repetition_penalty": 1e-6}, {"repetition_penalty": 0},
     "repetition_penalty"),
    ("repetition_penalty-inf", BOTH, {"repetition_penalty": 1e30},
     {"repetition_penalty": math.inf}, "repetition_penalty"),
    ("max_tokens", BOTH, {"max_tokens": 1}, {"max_tokens": 0}, "max_tokens"),
    ("max_completion_tokens", (CHAT,), {"max_completion_tokens": 1},
     {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("min_tokens", BOTH, {"min_tokens": 1, "max_tokens": 1}, {"min_tokens": 2, "max_tokens": 1},
     "min_tokens"),
    ("seed", BOTH, {"seed": 2**64 - 1}, {"seed": 2**64}, "seed"),
    ("seed-negative", BOTH, {"seed": 0}, {"seed": -1}, "seed"),
    # priority: [-1000, 1000] under --allow-client-priority
    ("priority", BOTH, {"priority": 1000}, {"priority": 1001}, "priority"),
    ("priority-negative", BOTH, {"priority": -1000}, {"priority": -1001}, "priority"),
    # cache_salt: 1-256 characters
    ("cache_salt", BOTH, {"cache_salt": "s" * 256}, {"cache_salt": "s" * 257}, "cache_salt"),
    ("cache_salt-empty", BOTH, {"cache_salt": "s"}, {"cache_salt": ""}, "cache_salt"),
    # prompt + max_tokens: the context length (a prompt of 63 tokens + 1, not + 2)
    ("context", (CMPL,), {"prompt": token_prompt(MAX_MODEL_LEN - 1), "max_tokens": 1},
     {"prompt": token_prompt(MAX_MODEL_LEN - 1), "max_tokens": 2}, "max_tokens"),
]


def http_cases(rows) -> list:
    return [pytest.param(path, *row[2:], id=f"{row[0]}-{API[path]}")
            for row in rows for path in row[1]]


def num_choices(fields: dict) -> int:
    """n choices per prompt; a list of token-id lists is several prompts."""
    prompt = fields.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], list) else 1
    return fields.get("n", 1) * prompts


@pytest.mark.parametrize("path, at_limit, past_limit, param", http_cases(HTTP_ROWS))
def test_http_limit_holds_exactly_at_its_boundary(stack, path, at_limit, past_limit, param):
    status, reply, _ = post(stack, path, http_body(path, at_limit))
    assert_served(status, reply, num_choices(at_limit))
    assert_refused(*post(stack, path, http_body(path, past_limit)), param)


CONTEXT_CHARS = CHARS_PER_TOKEN * MAX_MODEL_LEN
CONTEXT_RULE = "maximum context length"
# Limits that another rule reaches first: exactly at the limit the request is refused too, but
# by that other rule (its message), and one past it by the limit's own.
# (id, paths, fields at the limit, (param, message) there, fields past it, (param, message))
HTTP_WHICH_RULE = [
    # prompt text: at most 32 characters per token of the context, before tokenizing; 2048
    # characters pass the cap and are then too many tokens
    ("prompt-chars", (CMPL,), {"prompt": "a" * CONTEXT_CHARS}, ("max_tokens", CONTEXT_RULE),
     {"prompt": "a" * (CONTEXT_CHARS + 1)}, ("prompt", "characters")),
    ("messages-chars", (CHAT,), chat_of("a" * CONTEXT_CHARS), ("max_tokens", CONTEXT_RULE),
     chat_of("a" * (CONTEXT_CHARS + 1)), ("messages", "characters")),
    ("messages-chars-summed", (CHAT,),
     {"messages": [{"role": "system", "content": "a" * (CONTEXT_CHARS - 1)},
                   {"role": "user", "content": "a"}]}, ("max_tokens", CONTEXT_RULE),
     {"messages": [{"role": "system", "content": "a" * CONTEXT_CHARS},
                   {"role": "user", "content": "a"}]}, ("messages", "characters")),
    # logit_bias: at most 300 entries; the tiny model has only 264 token ids, so 300 distinct
    # keys hold one outside the vocabulary (the whole vocabulary is served: HTTP_ROWS)
    ("logit_bias-count", BOTH, {"logit_bias": {str(i): 1 for i in range(300)}},
     ("logit_bias", "vocabulary"), {"logit_bias": {str(i): 1 for i in range(301)}},
     ("logit_bias", "at most 300 entries")),
]


@pytest.mark.parametrize("path, at_limit, at_rule, past_limit, past_rule", [
    pytest.param(path, *row[2:], id=f"{row[0]}-{API[path]}")
    for row in HTTP_WHICH_RULE for path in row[1]])
def test_http_which_rule_fires_on_each_side_of_a_limit(stack, path, at_limit, at_rule,
                                                       past_limit, past_rule):
    at = post(stack, path, http_body(path, at_limit))
    past = post(stack, path, http_body(path, past_limit))
    assert_refused(*at, *at_rule)
    assert_refused(*past, *past_rule)
    assert at[1]["error"]["message"] != past[1]["error"]["message"]


def tokens(stack: str, body: dict) -> int:
    status, reply, _ = post(stack, "/tokenize", body)
    assert status == 200, reply
    return reply["count"]


def chat_of_tokens(stack: str, count: int) -> dict:
    """A chat whose rendered prompt is `count` tokens (each "a" is one token)."""
    overhead = tokens(stack, chat_of(""))
    chat = chat_of("a" * (count - overhead))
    assert tokens(stack, chat) == count
    return chat


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_http_chat_prompt_and_max_tokens_fill_the_context_exactly(stack, field):
    chat = chat_of_tokens(stack, MAX_MODEL_LEN - 1)
    status, reply, _ = post(stack, CHAT, {**chat, field: 1})
    assert_served(status, reply)
    assert reply["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    assert_refused(*post(stack, CHAT, {**chat, field: 2}), field, CONTEXT_RULE)


def test_the_prompt_fills_the_kv_pool_exactly(stack):
    """The pool holds exactly one context (16 blocks of 4 tokens: the executor refuses to start
    with less, so the pool rule of admission can never fire before the context rule; it is
    checked at its boundary in process, tests/test_request_surface.py). A prompt of pool
    tokens - 1 takes the whole pool with its one output token; one token more is refused by the
    context rule at the gateway, never reaching admission's pool rule."""
    pool_tokens = stack.stats().executors[0].total_blocks * BLOCK_SIZE
    assert pool_tokens == MAX_MODEL_LEN
    status, reply, _ = post(stack, CMPL, {"prompt": token_prompt(pool_tokens - 1), "max_tokens": 1})
    assert_served(status, reply)
    past = post(stack, CMPL, {"prompt": token_prompt(pool_tokens), "max_tokens": 1})
    assert_refused(*past, "max_tokens", CONTEXT_RULE)
    assert "KV blocks" not in past[1]["error"]["message"]


def send_body(stack: str, size: int, chunked: bool) -> tuple[int, dict]:
    """POSTs a completions body of exactly `size` bytes (one long prompt), with its
    Content-Length or chunked; (status, JSON reply). The server may stop reading early."""
    head = b'{"prompt": "'
    body = head + b"a" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    address = urllib.parse.urlsplit(stack)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        if chunked:
            pieces = (body[i:i + 2**20] for i in range(0, size, 2**20))
            connection.request("POST", CMPL, pieces, headers, encode_chunked=True)
        else:
            connection.request("POST", CMPL, body, headers)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before the whole body was sent: the answer is waiting
    reply = connection.getresponse()
    try:
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_http_body_of_exactly_16_mib_is_read_and_one_byte_more_is_413(stack, chunked):
    status, reply = send_body(stack, MAX_BODY_BYTES, chunked)
    # read and parsed: refused for its prompt (over the character cap), not for its size
    assert status == 400 and reply["error"]["param"] == "prompt", reply
    status, reply = send_body(stack, MAX_BODY_BYTES + 1, chunked)
    assert status == 413, reply
    assert reply["error"]["type"] == "invalid_request_error", reply
    assert str(MAX_BODY_BYTES) in reply["error"]["message"], reply


# -- gRPC ----------------------------------------------------------------------------------

def grpc_request(fields: dict) -> generation_pb2.GenerateRequest:
    """A Generate request of a one-token prompt and one output token per sequence, with
    `fields` (those under "sampling" are SamplingParams'). EOS is ignored: each of n sampled
    sequences may draw it first, and the test counts one token per sequence."""
    fields = dict(fields)
    sampling = S(**{"max_tokens": 1, "ignore_eos": True, **fields.pop("sampling", {})})
    if not {"text", "token_ids", "chat"} & fields.keys():
        fields["text"] = "x"
    return generation_pb2.GenerateRequest(**fields, sampling=sampling)


def generate(stub, fields: dict) -> list[generation_pb2.GenerateResponse]:
    return list(stub.Generate(grpc_request(fields), timeout=60))


def refusal(stub, fields: dict) -> tuple[grpc.RpcError, float]:
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, fields)
    return error.value, time.perf_counter() - start


def assert_grpc_refused(stub, fields: dict, field: str, says: str | None = None) -> str:
    """INVALID_ARGUMENT naming `field` in its details, at once; the details."""
    error, elapsed = refusal(stub, fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field in error.details(), error.details()
    if says is not None:
        assert says in error.details(), error.details()
    assert elapsed < FAST_S, f"refused after {elapsed:.2f} s"
    return error.details()


def tokens_of(n: int) -> common_pb2.TokenIds:
    return common_pb2.TokenIds(ids=token_prompt(n))


def sampling(**fields: Any) -> dict:
    return {"sampling": fields}


# (id, request fields at the limit, one past it, the field named in the details)
GRPC_ROWS: list[tuple[str, dict, dict, str]] = [
    ("n", sampling(n=MAX_NUM_SEQS), sampling(n=MAX_NUM_SEQS + 1), "sampling.n"),
    # the executor's --max-logprobs (bug: passed the gateway; the executor was dropped)
    ("logprobs", sampling(logprobs=MAX_LOGPROBS), sampling(logprobs=MAX_LOGPROBS + 1),
     "sampling.logprobs"),
    ("prompt_logprobs", sampling(prompt_logprobs=MAX_LOGPROBS),
     sampling(prompt_logprobs=MAX_LOGPROBS + 1), "sampling.prompt_logprobs"),
    ("stop-count", sampling(stop=["s"] * 16), sampling(stop=["s"] * 17), "sampling.stop"),
    ("stop-chars", sampling(stop=["s" * 256]), sampling(stop=["s" * 257]), "sampling.stop"),
    ("stop-empty", sampling(stop=["s"]), sampling(stop=[""]), "sampling.stop"),
    ("logit_bias-value", sampling(logit_bias={5: 100}), sampling(logit_bias={5: 100.001}),
     "sampling.logit_bias"),
    ("logit_bias-value-negative", sampling(logit_bias={5: -100}),
     sampling(logit_bias={5: -100.001}), "sampling.logit_bias"),
    ("logit_bias-nan", sampling(logit_bias={5: 0}), sampling(logit_bias={5: NAN}),
     "sampling.logit_bias"),
    ("logit_bias-key", sampling(logit_bias={VOCAB - 1: 1}), sampling(logit_bias={VOCAB: 1}),
     "sampling.logit_bias"),
    ("logit_bias-whole-vocab", sampling(logit_bias=dict.fromkeys(range(VOCAB), 0)),
     sampling(logit_bias=dict.fromkeys(range(301), 0)), "sampling.logit_bias"),
    ("stop_token_ids-count", sampling(stop_token_ids=[5] * 64),
     sampling(stop_token_ids=[5] * 65), "sampling.stop_token_ids"),
    ("stop_token_ids-id", sampling(stop_token_ids=[VOCAB - 1]),
     sampling(stop_token_ids=[VOCAB]), "sampling.stop_token_ids"),
    ("token-id-prompt", {"token_ids": common_pb2.TokenIds(ids=[VOCAB - 1])},
     {"token_ids": common_pb2.TokenIds(ids=[VOCAB])}, "token_ids"),
    ("temperature", sampling(temperature=0), sampling(temperature=-1e-6),
     "sampling.temperature"),
    ("temperature-nan", sampling(temperature=1.5), sampling(temperature=NAN),
     "sampling.temperature"),
    ("temperature-inf", sampling(temperature=1e30), sampling(temperature=math.inf),
     "sampling.temperature"),
    ("top_p", sampling(top_p=1), sampling(top_p=1.000001), "sampling.top_p"),
    ("top_p-above-0", sampling(top_p=1e-6), sampling(top_p=0), "sampling.top_p"),
    ("top_p-nan", sampling(top_p=0.5), sampling(top_p=NAN), "sampling.top_p"),
    ("top_k", sampling(top_k=-1), sampling(top_k=-2), "sampling.top_k"),
    ("min_p", sampling(min_p=1), sampling(min_p=1.000001), "sampling.min_p"),
    ("min_p-negative", sampling(min_p=0), sampling(min_p=-1e-6), "sampling.min_p"),
    ("min_p-nan", sampling(min_p=0.5), sampling(min_p=NAN), "sampling.min_p"),
    # [-2, 2] (bug: gRPC took 1e6)
    ("presence_penalty", sampling(presence_penalty=2), sampling(presence_penalty=2.000001),
     "sampling.presence_penalty"),
    ("presence_penalty-negative", sampling(presence_penalty=-2),
     sampling(presence_penalty=-2.000001), "sampling.presence_penalty"),
    ("presence_penalty-nan", sampling(presence_penalty=0), sampling(presence_penalty=NAN),
     "sampling.presence_penalty"),
    ("frequency_penalty", sampling(frequency_penalty=2), sampling(frequency_penalty=2.000001),
     "sampling.frequency_penalty"),
    ("frequency_penalty-negative", sampling(frequency_penalty=-2),
     sampling(frequency_penalty=-2.000001), "sampling.frequency_penalty"),
    ("repetition_penalty", sampling(repetition_penalty=1e-6), sampling(repetition_penalty=0),
     "sampling.repetition_penalty"),
    ("repetition_penalty-inf", sampling(repetition_penalty=1e30),
     sampling(repetition_penalty=math.inf), "sampling.repetition_penalty"),
    ("max_tokens", sampling(max_tokens=1), sampling(max_tokens=0), "sampling.max_tokens"),
    ("min_tokens", sampling(min_tokens=1, max_tokens=1), sampling(min_tokens=2, max_tokens=1),
     "sampling.min_tokens"),
    ("priority", {"priority": 1000}, {"priority": 1001}, "priority"),
    ("priority-negative", {"priority": -1000}, {"priority": -1001}, "priority"),
    ("cache_salt", {"cache_salt": "s" * 256}, {"cache_salt": "s" * 257}, "cache_salt"),
    ("request_id", {"request_id": "r" * 256}, {"request_id": "r" * 257}, "request_id"),
    # prompt + max_tokens: the context length
    ("context", {"token_ids": tokens_of(MAX_MODEL_LEN - 1), "sampling": {"max_tokens": 1}},
     {"token_ids": tokens_of(MAX_MODEL_LEN - 1), "sampling": {"max_tokens": 2}}, "max_tokens"),
]


@pytest.mark.parametrize("at_limit, past_limit, field", [
    pytest.param(*row[1:], id=row[0]) for row in GRPC_ROWS])
def test_grpc_limit_holds_exactly_at_its_boundary(stub, at_limit, past_limit, field):
    replies = generate(stub, at_limit)
    n = at_limit.get("sampling", {}).get("n", 1)
    assert replies[-1].usage.completion_tokens == n
    if "request_id" in at_limit:
        assert {r.request_id for r in replies} == {at_limit["request_id"]}
    assert_grpc_refused(stub, past_limit, field)


def test_grpc_seed_holds_every_value_below_2_to_the_64(stub):
    """seed in [0, 2^64): a uint64 holds exactly that, so no client can send one past it."""
    assert generate(stub, sampling(seed=2**64 - 1))[-1].usage.completion_tokens == 1
    with pytest.raises(ValueError):
        S(seed=2**64)


# (id, fields at the limit, (field, message) there, fields past it, (field, message) there)
GRPC_WHICH_RULE = [
    ("text-chars", {"text": "a" * CONTEXT_CHARS}, ("max_tokens", CONTEXT_RULE),
     {"text": "a" * (CONTEXT_CHARS + 1)}, ("text", "characters")),
    ("chat-chars", {"chat": generation_pb2.ChatPrompt(messages=[
        generation_pb2.ChatMessage(role="user", content="a" * CONTEXT_CHARS)])},
     ("max_tokens", CONTEXT_RULE),
     {"chat": generation_pb2.ChatPrompt(messages=[
         generation_pb2.ChatMessage(role="user", content="a" * (CONTEXT_CHARS + 1))])},
     ("chat.messages", "characters")),
    ("logit_bias-count", sampling(logit_bias=dict.fromkeys(range(300), 1)),
     ("sampling.logit_bias", "vocabulary"), sampling(logit_bias=dict.fromkeys(range(301), 1)),
     ("sampling.logit_bias", "at most 300 entries")),
]


@pytest.mark.parametrize("at_limit, at_rule, past_limit, past_rule", [
    pytest.param(*row[1:], id=row[0]) for row in GRPC_WHICH_RULE])
def test_grpc_which_rule_fires_on_each_side_of_a_limit(stub, at_limit, at_rule, past_limit,
                                                       past_rule):
    at = assert_grpc_refused(stub, at_limit, *at_rule)
    past = assert_grpc_refused(stub, past_limit, *past_rule)
    assert at != past


def test_grpc_prompt_fills_the_kv_pool_exactly(stub):
    """As over HTTP (test_the_prompt_fills_the_kv_pool_exactly), with max_tokens unset."""
    replies = list(stub.Generate(generation_pb2.GenerateRequest(
        token_ids=tokens_of(MAX_MODEL_LEN - 1)), timeout=60))
    assert replies[-1].usage.completion_tokens == 1  # the one token the context has room for
    details = assert_grpc_refused(stub, {"token_ids": tokens_of(MAX_MODEL_LEN)}, CONTEXT_RULE)
    assert "KV blocks" not in details


def message_of(size: int) -> generation_pb2.GenerateRequest:
    """A Generate request whose encoding is exactly `size` bytes (one long text)."""
    request = generation_pb2.GenerateRequest(text="a" * (size - 8))
    request.text += "a" * (size - request.ByteSize())
    assert request.ByteSize() == size
    return request


def test_grpc_message_of_exactly_64_mib_is_read_and_one_byte_more_is_refused(stack):
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(stack.grpc, options=options) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as read:
            list(stub.Generate(message_of(MAX_MESSAGE_BYTES), timeout=60))
        # parsed: refused for its text (over the character cap), not for its size
        assert read.value.code() == grpc.StatusCode.INVALID_ARGUMENT, read.value.details()
        assert "text" in read.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(message_of(MAX_MESSAGE_BYTES + 1), timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, \
            refused.value.details()


# -- found on the way ----------------------------------------------------------------------

def test_n_sequences_that_can_never_share_the_pool_are_refused_at_once(stack):
    """n = 8 sequences of a 50-token prompt: the prompt (50 + 1 tokens, 13 blocks) fits the
    pool of 16, but forking copies each child's partly filled last block (12 shared blocks +
    8 own > 16), so the request can never run. It used to be queued and end with 504 at its
    timeout; it is refused at once naming n, as a prompt over the pool is."""
    request = urllib.request.Request(
        f"{stack}{CMPL}", data=json.dumps({"prompt": token_prompt(50), "n": MAX_NUM_SEQS,
                                           "max_tokens": 1}).encode(),
        headers={"Content-Type": "application/json", "X-Request-Timeout": "3"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, body = reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        status, body = error.code, json.loads(error.read())
    assert status == 400 and body["error"]["param"] == "n", body
    assert time.perf_counter() - start < FAST_S


# -- after every limit ----------------------------------------------------------------------

def test_the_stack_still_serves_with_its_first_executor(stack, stub):
    """No refused request cost the executor its place (a request over --max-logprobs used to):
    the executor that registered first still serves, never dropped, and every block is free
    again."""
    status, reply, _ = post(stack, CMPL, {"prompt": "the cat", "max_tokens": 2,
                                          "ignore_eos": True})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply
    status, reply, _ = post(stack, CHAT, {**chat_of("hi"), "max_tokens": 2})
    assert_served(status, reply)
    replies = generate(stub, {"text": "the cat", "sampling": {"max_tokens": 2,
                                                               "ignore_eos": True}})
    assert replies[-1].usage.completion_tokens == 2
    (executor,) = stack.wait_until_all_blocks_free().executors
    assert executor.executor_id == stack.executor_id
    # An executor that refuses a plan is dropped and registers again under its old id: only
    # the log tells. No process behind the gateway warned of anything (lost executor, refused
    # plan, restart).
    events = [json.loads(line) for line in stack.log_path.read_text().splitlines()
              if line.startswith("{")]
    assert {e["service"] for e in events} >= {"up", "scheduler", "executor", "gateway"}
    troubles = [e for e in events if e["service"] != "gateway"
                and e["level"] in ("warning", "error", "critical")]
    assert not troubles, troubles
