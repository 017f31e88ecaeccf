"""The request surface of issue 16, in process (the gateway over a scripted scheduler, the
scheduler's admission and cluster over idle executors):

- one set of request rules for HTTP, gRPC and the scheduler's admission, against the serving
  executor's limits (runtime/request_rules.py);
- scheduler-side request ids are the gateway's, never a client's; the scheduler refuses a
  malformed id and one already in flight;
- cache_salt reaches the scheduler, whose prefix cache never shares blocks across salts;
  salting by API key;
- priority only under --allow-client-priority, within bounds;
- fields the server does not honour are refused by name;
- bad input that used to answer 500 (no chat template, logit_bias key "²", non-ASCII bearer);
- tokenization runs off the event loop, after a character cap.

The end-to-end twins (a real stack: cached_tokens across salts, same gRPC id twice) are in
tests/test_openai_api.py and tests/test_bad_inputs.py."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import httpx2 as httpx
import pytest

from pagedserve.gateway.auth import ApiKeys, require_api_key
from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.grpc_api import GenerationService
from pagedserve.gateway.http_api import create_app
from pagedserve.gateway.policy import DEFAULT_POLICY, ClientPolicy
from pagedserve.gateway.prompts import MAX_CHARS_PER_TOKEN
from pagedserve.gateway.scheduler_client import ServedModel
from pagedserve.runtime.request_rules import MAX_N, MAX_PRIORITY, MAX_STOP_TOKEN_IDS
from pagedserve.runtime.serving import GrpcServer, free_ports
from pagedserve.scheduler.admission import AdmissionError, PoolLimits, admit_request
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.cluster import Cluster, ClusterConfig, DuplicateRequest, Submission
from pagedserve.scheduler.server import SchedulerService
from pagedserve.testing.tiny_models import byte_level_tokenizer
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc, scheduler_pb2

MAX_LOGPROBS = 5  # the scripted executor's --max-logprobs (the gateway used to allow 20)
MAX_MODEL_LEN = 256
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
S = common_pb2.SamplingParams


class ScriptedScheduler:
    """Stands in for SchedulerClient: serves one model (its executor allows MAX_LOGPROBS) and
    answers every Submit with one token per sequence (and a vector, when it asks for pooling),
    recording what was submitted."""

    def __init__(self, tokenizer=None):
        tokenizer = tokenizer or byte_level_tokenizer()
        self.served = ServedModel(
            info=common_pb2.ModelInfo(model_id="m", max_model_len=MAX_MODEL_LEN,
                                      vocab_size=len(byte_level_tokenizer()),
                                      eos_token_ids=[2]),
            tokenizer=tokenizer, limits=common_pb2.ExecutorLimits(max_logprobs=MAX_LOGPROBS))
        self.submitted: list[scheduler_pb2.SubmitRequest] = []

    async def model(self, name: str = "") -> ServedModel:
        if name not in ("", "m"):
            raise GatewayError(404, f"model {name!r} is not served", "not_found_error", "model")
        return self.served

    async def generate(self, submit, deadline):
        self.submitted.append(submit)
        for i in range(max(1, submit.sampling.n)):
            yield scheduler_pb2.TokenDelta(
                seq_index=i, token_ids=[70], finish_reason=common_pb2.FINISH_REASON_LENGTH,
                num_prompt_tokens=len(submit.prompt_token_ids),
                embedding=[1.0, 0.0] if submit.sampling.HasField("pooling") else [])

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        pass


def http(scheduler: ScriptedScheduler, policy: ClientPolicy = DEFAULT_POLICY,
         keys: ApiKeys | None = None):
    app = create_app(scheduler, policy=policy)
    if keys is not None:
        require_api_key(app, keys)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway")


def post(path: str, body: dict, scheduler: ScriptedScheduler | None = None,
         policy: ClientPolicy = DEFAULT_POLICY, headers: dict | None = None,
         keys: ApiKeys | None = None) -> httpx.Response:
    async def run():
        async with http(scheduler or ScriptedScheduler(), policy, keys) as client:
            return await client.post(path, json=body, headers=headers)
    return asyncio.run(run())


def assert_refused(reply: httpx.Response, param: str, status: int = 400) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"], error


# -- unsupported fields -------------------------------------------------------------------

@pytest.mark.parametrize("path, field, value", [
    (CHAT, "functions", [{"name": "f"}]),  # OpenAI's field before tools
    (CHAT, "tool_choice", "auto"),  # no tools to choose from
    (CMPL, "best_of", 2),
    (CMPL, "guided_json", {"type": "object"}),
    (CHAT, "guided_json", {"type": "object"}),
    (CMPL, "suffix", "x"),
])
def test_a_field_the_server_does_not_honour_is_refused_by_name(path, field, value):
    body = {"messages": MSG} if path == CHAT else {"prompt": "x"}
    assert_refused(post(path, {**body, field: value}), field)


def test_top_logprobs_without_logprobs_is_refused_by_name():
    """OpenAI: `logprobs` must be true to use `top_logprobs` (vLLM refuses a count above 0
    without it). Ignored, it was never checked against the executor's limit either."""
    for extra in ({"top_logprobs": MAX_LOGPROBS + 1}, {"logprobs": False, "top_logprobs": 1}):
        assert_refused(post(CHAT, {"messages": MSG, **extra}), "top_logprobs")
    scheduler = ScriptedScheduler()  # 0 asks for no alternatives: nothing to ignore
    assert post(CHAT, {"messages": MSG, "top_logprobs": 0}, scheduler).status_code == 200
    assert post(CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 2},
                scheduler).status_code == 200
    assert [s.sampling.HasField("logprobs") for s in scheduler.submitted] == [False, True]
    assert scheduler.submitted[1].sampling.logprobs == 2


def test_an_unknown_field_inside_a_message_is_refused_by_name():
    assert_refused(post(CHAT, {"messages": [{"role": "user", "content": "x", "audio": "a"}]}),
                   "messages.0.audio")


# -- one validator: the executor's limits, NaN, counts --------------------------------------

@pytest.mark.parametrize("path, extra, param", [
    (CMPL, {"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs"),
    (CMPL, {"stop_token_ids": [5] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    (CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    (CMPL, {"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    (CMPL, {"logit_bias": {"²": 1}}, "logit_bias"),
    (CMPL, {"logit_bias": {"5": 1000}}, "logit_bias"),
    (CMPL, {"top_k": 2**40}, "top_k"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CMPL, {"n": 3, "use_beam_search": True, "max_tokens": 4}, "n"),  # 2n > max_logprobs
])
def test_http_applies_the_shared_rules_against_the_executor_limits(path, extra, param):
    body = {"messages": MSG} if path == CHAT else {"prompt": "x"}
    assert_refused(post(path, {**body, **extra}), param)


def test_logprobs_up_to_the_executor_limit_are_accepted():
    scheduler = ScriptedScheduler()
    assert post(CMPL, {"prompt": "x", "logprobs": MAX_LOGPROBS}, scheduler).status_code == 200
    assert scheduler.submitted[0].sampling.logprobs == MAX_LOGPROBS


def test_n_up_to_the_fixed_cap_is_accepted_over_both_apis():
    """n in 1-64 (request_rules.MAX_N) where the executor's --max-num-seqs would allow more:
    64 is served over HTTP and gRPC, 65 refused naming the field (the --max-num-seqs bound
    below it is checked through the processes: tests/test_limits.py)."""
    scheduler = ScriptedScheduler()
    scheduler.served.limits.max_num_seqs = 256
    reply = post(CMPL, {"prompt": "x", "n": MAX_N}, scheduler)
    assert reply.status_code == 200 and len(reply.json()["choices"]) == MAX_N, reply.text
    assert_refused(post(CHAT, {"messages": MSG, "n": MAX_N + 1}, scheduler), "n")

    async def test(stub):
        replies = await generate(stub, text="x", sampling=S(n=MAX_N))
        assert {c.index for r in replies for c in r.choices} == set(range(MAX_N))
        await assert_grpc_refused(stub, "sampling.n", text="x", sampling=S(n=MAX_N + 1))
    serve_grpc(scheduler, ClientPolicy(), test)
    assert [s.sampling.n for s in scheduler.submitted] == [MAX_N, MAX_N]


GRPC_RULES = [
    (S(presence_penalty=3), "sampling.presence_penalty"),
    (S(frequency_penalty=-2.5), "sampling.frequency_penalty"),
    (S(temperature=math.nan), "sampling.temperature"),
    (S(temperature=math.inf), "sampling.temperature"),
    (S(repetition_penalty=math.nan), "sampling.repetition_penalty"),
    (S(top_p=math.nan), "sampling.top_p"),
    (S(logit_bias={5: math.nan}), "sampling.logit_bias"),
    (S(prompt_logprobs=10**6), "sampling.prompt_logprobs"),
    (S(prompt_logprobs=MAX_LOGPROBS + 1), "sampling.prompt_logprobs"),
    (S(logprobs=MAX_LOGPROBS + 1), "sampling.logprobs"),
    (S(stop_token_ids=[5] * (MAX_STOP_TOKEN_IDS + 1)), "sampling.stop_token_ids"),
]


def serve_grpc(scheduler: ScriptedScheduler, policy: ClientPolicy, test) -> None:
    """Runs `test(stub)` against a Generation service over the scripted scheduler."""
    async def run():
        (port,) = free_ports(1)
        server = GrpcServer(f"127.0.0.1:{port}", [])
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(scheduler, policy), server.server)
        await server.start(["pagedserve.v1.Generation"])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await test(generation_pb2_grpc.GenerationStub(channel))
        finally:
            await server.stop()
    asyncio.run(run())


async def generate(stub, **request) -> list[generation_pb2.GenerateResponse]:
    return [reply async for reply in stub.Generate(
        generation_pb2.GenerateRequest(**request), timeout=10)]


async def assert_grpc_refused(stub, field: str, **request) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate(stub, **request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert field in error.value.details()


def test_grpc_applies_the_same_rules_as_http():
    scheduler = ScriptedScheduler()

    async def test(stub):
        for sampling, field in GRPC_RULES:
            await assert_grpc_refused(stub, field, text="x", sampling=sampling)
        assert not scheduler.submitted
        await generate(stub, text="x", sampling=S(logprobs=MAX_LOGPROBS,
                                                   prompt_logprobs=MAX_LOGPROBS))
        assert len(scheduler.submitted) == 1
    serve_grpc(scheduler, ClientPolicy(), test)


@pytest.mark.parametrize("sampling, field", GRPC_RULES)
def test_admission_applies_the_rules_against_the_pool_limits(sampling, field):
    limits = PoolLimits(max_model_len=64, num_blocks=16, block_size=4, max_num_seqs=4,
                        vocab_size=100, max_logprobs=MAX_LOGPROBS)
    with pytest.raises(AdmissionError, match=field):
        admit_request("r", [1, 2, 3], sampling, 0, limits, emit=lambda delta: None)


@pytest.mark.parametrize("kwargs, field", [
    ({"sampling": S(n=5)}, "sampling.n"),  # over max_num_seqs
    ({"sampling": S(stop_token_ids=[100])}, "sampling.stop_token_ids"),  # outside the vocab
    ({"priority": -2**31}, "priority"),
    ({"priority": MAX_PRIORITY + 1}, "priority"),
    ({"cache_salt": "s" * 257}, "cache_salt"),
])
def test_admission_bounds_what_any_caller_sends(kwargs, field):
    limits = PoolLimits(max_model_len=64, num_blocks=16, block_size=4, max_num_seqs=4,
                        vocab_size=100, max_logprobs=MAX_LOGPROBS)
    args = {"sampling": S(), "priority": 0, **kwargs}
    with pytest.raises(AdmissionError, match=field):
        admit_request("r", [1, 2, 3], args["sampling"], args["priority"], limits,
                      emit=lambda delta: None, cache_salt=args.get("cache_salt", ""))


# Each admission limit at its boundary: exactly at it admitted, one past it refused (issue 18).
def _pool(**changes) -> PoolLimits:
    return PoolLimits(**{"max_model_len": 64, "num_blocks": 64, "block_size": 4,
                         "max_num_seqs": 4, "vocab_size": 100, "max_logprobs": MAX_LOGPROBS,
                         **changes})


@pytest.mark.parametrize("limits, at_limit, past_limit, field", [
    # prompt + one output token must fit the context: 63 tokens do, 64 do not
    (_pool(), ([1] * 63, S()), ([1] * 64, S()), "prompt_token_ids"),
    # prompt + one token must fit the whole pool: 8 blocks of 4 hold 31 + 1, not 32 + 1
    (_pool(num_blocks=8), ([1] * 31, S()), ([1] * 32, S()), "prompt_token_ids"),
    # n sequences at most max_num_seqs
    (_pool(), ([1, 2], S(n=4)), ([1, 2], S(n=5)), "sampling.n"),
    # n sequences must fit the pool together: a 50-token prompt forks after 49 tokens, sharing
    # 12 full blocks of 4; each sequence owns 1 more (51 tokens in 13): 12 + 3 fit 15, 12 + 4
    # do not (and the prompt alone, 13 blocks, fits either way)
    (_pool(num_blocks=15, max_num_seqs=8), ([1] * 50, S(n=3)), ([1] * 50, S(n=4)),
     "sampling.n"),
])
def test_admission_limits_hold_exactly_at_their_boundary(limits, at_limit, past_limit, field):
    prompt, sampling = at_limit
    admit_request("r", prompt, sampling, 0, limits, emit=lambda delta: None)
    prompt, sampling = past_limit
    with pytest.raises(AdmissionError, match=field):
        admit_request("r", prompt, sampling, 0, limits, emit=lambda delta: None)


# -- ids --------------------------------------------------------------------------------

def test_the_scheduler_never_sees_a_client_s_request_id():
    scheduler = ScriptedScheduler()

    async def test(stub):
        first = await generate(stub, request_id="a", text="x")
        second = await generate(stub, request_id="a", text="x", sampling=S(n=2))
        unlabelled = await generate(stub, text="x")
        assert {r.request_id for r in first + second} == {"a"}  # echoed as a label
        ids = [s.request_id for s in scheduler.submitted]
        assert len(set(ids)) == 3 and "a" not in ids
        assert unlabelled[0].request_id == ids[2]
        await assert_grpc_refused(stub, "request_id", request_id="x" * 257, text="x")
    serve_grpc(scheduler, ClientPolicy(), test)


class AbortContext:
    """What SchedulerService.Submit needs of a grpc context."""

    def time_remaining(self):
        return None

    async def abort(self, code, details):
        raise grpc.RpcError(code, details)


def idle_cluster_run(test) -> None:
    class IdleHandle:
        async def send(self, plan):
            await asyncio.Event().wait()

        async def receive(self):
            await asyncio.Event().wait()

        async def close(self):
            pass

    async def main():
        cluster = Cluster(ClusterConfig(), make_handle=lambda *address: IdleHandle())
        await test(cluster)
    asyncio.run(main())


async def submit(service: SchedulerService, request_id: str) -> None:
    request = scheduler_pb2.SubmitRequest(request_id=request_id, prompt_token_ids=[1, 2],
                                          sampling=S(max_tokens=2))
    stream = service.Submit(request, AbortContext())
    await anext(stream)


@pytest.mark.parametrize("request_id", ["a/0", "x" * 129, "a b", "é", "\n"])
def test_the_scheduler_refuses_a_malformed_request_id(request_id):
    async def test(cluster):
        service = SchedulerService(cluster, None)
        with pytest.raises(grpc.RpcError) as error:
            await submit(service, request_id)
        assert error.value.args[0] is grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in error.value.args[1]
        assert not cluster.failures
    idle_cluster_run(test)


def test_an_id_already_in_flight_is_refused_and_the_first_request_goes_on():
    async def test(cluster):
        first = Submission("a", [1, 2], S(max_tokens=2), 0, emit=lambda delta: None)
        cluster.submit("", first, fail=lambda code, message: None)
        with pytest.raises(DuplicateRequest, match="request_id"):
            cluster.submit("", Submission("a", [3], S(), 0, emit=lambda delta: None),
                           fail=lambda code, message: None)
        assert cluster.orphans[0].submission is first  # untouched
        cluster.finished("a")
        cluster.submit("", Submission("a", [3], S(), 0, emit=lambda delta: None),
                       fail=lambda code, message: None)  # free again once finished
    idle_cluster_run(test)


# -- cache salt -------------------------------------------------------------------------

def test_blocks_are_shared_only_between_requests_of_one_salt():
    blocks = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10))
    blocks.admit("a", prompt, salt=b"alice")
    blocks.allocate("a", len(prompt))
    blocks.commit("a", prompt, len(prompt))
    assert blocks.num_cached_prefix_tokens(prompt, b"alice") == 8
    assert blocks.num_cached_prefix_tokens(prompt, b"bob") == 0
    assert blocks.num_cached_prefix_tokens(prompt) == 0
    assert blocks.admit("b", prompt, salt=b"bob") == 0
    assert blocks.admit("c", prompt, salt=b"alice") == 8
    blocks.allocate("c", len(prompt))
    fork = blocks.fork("c", "c/1", 9)  # a fork extends its parent's salted chain
    assert fork is not None
    blocks.check_invariants()


def test_cache_salt_reaches_the_scheduler_from_both_apis():
    scheduler = ScriptedScheduler()
    assert post(CHAT, {"messages": MSG, "cache_salt": "s1"}, scheduler).status_code == 200
    assert post(CMPL, {"prompt": "x", "cache_salt": "s2"}, scheduler).status_code == 200
    assert_refused(post(CMPL, {"prompt": "x", "cache_salt": ""}), "cache_salt")

    async def test(stub):
        await generate(stub, text="x", cache_salt="s3")
        await assert_grpc_refused(stub, "cache_salt", text="x", cache_salt="s" * 257)
    serve_grpc(scheduler, ClientPolicy(), test)
    assert [s.cache_salt for s in scheduler.submitted] == ["s1", "s2", "s3"]


def test_salting_by_api_key_keeps_keys_apart():
    keys = ApiKeys.parse("k1, k2")
    scheduler = ScriptedScheduler()
    policy = ClientPolicy(salt_keys=keys)
    for key, salt in (("k1", None), ("k1", None), ("k2", None), ("k1", "x")):
        body = {"prompt": "x", **({"cache_salt": salt} if salt else {})}
        reply = post(CMPL, body, scheduler, policy, {"Authorization": f"Bearer {key}"}, keys)
        assert reply.status_code == 200, reply.text
    salts = [s.cache_salt for s in scheduler.submitted]
    assert salts[0] == salts[1] and len(set(salts)) == 3
    assert not any("k1" in s or "k2" in s for s in salts)


# -- priority ---------------------------------------------------------------------------

def test_priority_only_under_the_gateway_flag():
    scheduler = ScriptedScheduler()
    assert_refused(post(CMPL, {"prompt": "x", "priority": -5}, scheduler), "priority")
    allowed = ClientPolicy(allow_client_priority=True)
    assert post(CHAT, {"messages": MSG, "priority": -5}, scheduler, allowed).status_code == 200
    assert_refused(post(CHAT, {"messages": MSG, "priority": -MAX_PRIORITY - 1}, scheduler,
                        allowed), "priority")

    async def refused(stub):
        await assert_grpc_refused(stub, "priority", text="x", priority=-2**31)
    serve_grpc(scheduler, ClientPolicy(), refused)

    async def bounded(stub):
        await assert_grpc_refused(stub, "priority", text="x", priority=-2**31)
        await generate(stub, text="x", priority=7)
    serve_grpc(scheduler, allowed, bounded)
    assert [s.priority for s in scheduler.submitted] == [-5, 7]


# -- no 5xx on bad input ------------------------------------------------------------------

def test_chat_on_a_model_without_a_chat_template_is_a_400():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    assert_refused(post(CHAT, {"messages": MSG}, ScriptedScheduler(tokenizer)), "messages")


def test_a_chat_template_that_refuses_the_conversation_is_a_400():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    reply = post(CHAT, {"messages": MSG}, ScriptedScheduler(tokenizer))
    assert_refused(reply, "messages")
    assert "roles must alternate" in reply.json()["error"]["message"]


@pytest.mark.parametrize("header", ["Bearer ключ".encode(), b"Bearer \xff\xfe", b"Bearer k1x"])
def test_a_wrong_or_non_ascii_bearer_token_is_a_401(header):
    keys = ApiKeys.parse("k1,k2")
    reply = post(CMPL, {"prompt": "x"}, headers={"Authorization": header}, keys=keys)
    assert reply.status_code == 401, reply.text
    for key in ("k1", "k2"):
        assert post(CMPL, {"prompt": "x"}, headers={"Authorization": f"Bearer {key}"},
                    keys=keys).status_code == 200


# -- the event loop stays free ----------------------------------------------------------

class SlowTokenizer:
    """A tokenizer that takes `seconds` per call, as a huge prompt would; counts its calls."""

    def __init__(self, seconds: float):
        self.inner, self.seconds, self.calls = byte_level_tokenizer(), seconds, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.seconds)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenizing_a_prompt_does_not_stall_other_requests():
    tokenizer = SlowTokenizer(1.5)
    scheduler = ScriptedScheduler(tokenizer)

    async def run():
        async with http(scheduler) as client:
            big = asyncio.create_task(client.post(CMPL, json={"prompt": "x " * 50}))
            while not tokenizer.calls:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            health = await client.get("/health")
            waited = time.perf_counter() - start
            assert (await big).status_code == 200
            return health, waited
    health, waited = asyncio.run(run())
    assert health.status_code == 200 and waited < 0.5, waited


@pytest.mark.parametrize("path, body, param", [
    (CMPL, {"prompt": "x" * (MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN + 1)}, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * (MAX_CHARS_PER_TOKEN
                                                              * MAX_MODEL_LEN + 1)}]},
     "messages"),
    ("/tokenize", {"prompt": "x" * (MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN + 1)}, "prompt"),
])
def test_a_prompt_too_long_to_ever_fit_is_refused_before_it_is_tokenized(path, body, param):
    tokenizer = SlowTokenizer(0)
    assert_refused(post(path, body, ScriptedScheduler(tokenizer)), param)
    assert tokenizer.calls == 0
