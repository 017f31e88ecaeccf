"""Overload and deadlines (issue 9) against a real `pagedserve up` stack with the tiny model.

One sequence runs at a time (--max-num-seqs 1) and two may wait (--max-queue-len 2), so three
long requests fill the scheduler. A fourth is refused at once: HTTP 429 with Retry-After in
OpenAI's error shape, gRPC RESOURCE_EXHAUSTED with `retry-after` metadata; the three still get
every token they asked for. A request whose timeout (X-Request-Timeout, or the gRPC call
deadline) passes is answered 504 / DEADLINE_EXCEEDED and the scheduler frees its KV blocks."""

import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import psutil
import pytest

from pagedserve.gateway.errors import RETRY_AFTER_S, GatewayError
from pagedserve.gateway.http_api import TIMEOUT_HEADER, request_deadline
from pagedserve.testing.processes import running_stack
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow

MAX_QUEUE_LEN = 2
# Long enough to keep the one running slot busy (the tiny model's context is 256 tokens).
LONG = {"prompt": "the cat", "max_tokens": 240, "ignore_eos": True}
FAST_S = 1.0  # "at once"


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("overload") / "log", "--model",
                       str(tiny_llama_dir), "--kv-cache-gib", "0.01", "--max-num-seqs", "1",
                       "--max-queue-len", str(MAX_QUEUE_LEN), "--request-timeout", "120") as s:
        yield s


def post(stack, body: dict, headers: dict | None = None) -> tuple[int, dict, dict, float]:
    """(status, JSON body or SSE events, response headers, seconds)."""
    request = urllib.request.Request(
        f"{stack}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, raw, got_headers = reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as error:
        status, raw, got_headers = error.code, error.read(), dict(error.headers)
    elapsed = time.perf_counter() - start
    if body.get("stream") and status == 200:
        events = [json.loads(line[6:]) for line in raw.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        return status, {"events": events}, got_headers, elapsed
    return status, json.loads(raw), got_headers, elapsed


def assert_openai_error(reply: dict, status: int, error_type: str) -> None:
    assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["code"] == status and reply["error"]["type"] == error_type, reply


class Occupants:
    """Requests that hold the running slot and fill the queue, in background threads."""

    def __init__(self, stack, count: int):
        self.results: list[tuple[int, dict]] = []
        self.threads = [threading.Thread(target=self._run, args=(stack,)) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self, stack) -> None:
        status, reply, _, _ = post(stack, LONG)
        self.results.append((status, reply))

    def join(self) -> list[tuple[int, dict]]:
        for thread in self.threads:
            thread.join(timeout=120)
        return self.results


def wait_for(stack, predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not predicate(stats := stack.stats()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.01)
    return stats


def queue_full(stats) -> bool:
    return stats.num_running == 1 and stats.num_waiting == MAX_QUEUE_LEN


def test_a_full_queue_refuses_new_requests_at_once_and_spares_running_ones(stack):
    # The occupants are the gateway's first requests: concurrent first loads of the tokenizer
    # once raced inside transformers (a 500); they must all succeed.
    occupants = Occupants(stack, 1 + MAX_QUEUE_LEN)
    wait_for(stack, queue_full, "a full queue")
    for body in ({"prompt": "x", "max_tokens": 2}, {"prompt": "x", "max_tokens": 2,
                                                     "stream": True}):
        status, reply, headers, elapsed = post(stack, body)
        assert status == 429, reply
        assert_openai_error(reply, 429, "rate_limit_error")
        assert "queue is full" in reply["error"]["message"]
        assert int(headers["retry-after"]) == RETRY_AFTER_S
        assert elapsed < FAST_S
    with grpc.insecure_channel(stack.grpc) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(generation_pb2.GenerateRequest(
                text="x", sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=30))
        assert time.perf_counter() - start < FAST_S
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
    assert dict(error.value.trailing_metadata())["retry-after"] == str(RETRY_AFTER_S)
    # The refusals touched nothing: every occupant gets all its tokens.
    results = occupants.join()
    assert [status for status, _ in results] == [200] * (1 + MAX_QUEUE_LEN), results
    assert all(r["usage"]["completion_tokens"] == LONG["max_tokens"] for _, r in results)
    status, reply, _, _ = post(stack, {"prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2


def full_duration(stack) -> float:
    """Seconds LONG takes without a timeout: the fastest of three runs, so that a timeout set
    to a fraction of it surely passes while the request runs."""
    stack.wait_until_all_blocks_free()
    return min(post(stack, LONG)[3] for _ in range(3))


def test_a_running_request_past_its_timeout_is_aborted_and_frees_its_blocks(stack):
    full_s = full_duration(stack)
    timeout = full_s / 4
    status, reply, _, elapsed = post(stack, LONG, {TIMEOUT_HEADER: f"{timeout:.3f}"})
    assert status == 504, reply
    assert_openai_error(reply, 504, "timeout")
    assert "timeout" in reply["error"]["message"]
    assert timeout <= elapsed < timeout + FAST_S
    # Freed by the scheduler's abort, long before the request would have ended on its own.
    stats = stack.wait_until_all_blocks_free(timeout=full_s / 2)
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_a_streamed_request_past_its_timeout_ends_with_an_error_event(stack):
    full_s = full_duration(stack)
    status, reply, _, _ = post(stack, {**LONG, "stream": True},
                               {TIMEOUT_HEADER: f"{full_s / 3:.3f}"})
    assert status == 200  # headers went out with the first token
    events = reply["events"]
    # Tokens streamed before the deadline passed, then the error event.
    assert any(c["text"] for e in events[:-1] for c in e.get("choices", [])), events
    assert_openai_error(events[-1], 504, "timeout")
    assert sum(len(e.get("choices", [])) for e in events) < LONG["max_tokens"]
    stack.wait_until_all_blocks_free(timeout=full_s / 2)


def test_a_queued_request_past_its_timeout_leaves_the_queue(stack):
    occupant = Occupants(stack, 1)
    wait_for(stack, lambda s: s.num_running == 1, "the occupant to run")
    status, reply, _, elapsed = post(stack, {"prompt": "x", "max_tokens": 2},
                                     {TIMEOUT_HEADER: "0.2"})
    assert status == 504 and elapsed < 0.2 + FAST_S, reply
    assert stack.stats().num_waiting == 0  # it left the queue; the occupant runs on
    assert occupant.join()[0][1]["usage"]["completion_tokens"] == LONG["max_tokens"]


def test_grpc_call_deadline_aborts_the_request_on_the_scheduler(stack):
    full_s = full_duration(stack)
    with grpc.insecure_channel(stack.grpc) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(generation_pb2.GenerateRequest(
                text="the cat", sampling=common_pb2.SamplingParams(
                    max_tokens=LONG["max_tokens"], ignore_eos=True)), timeout=full_s / 4))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = stack.wait_until_all_blocks_free(timeout=full_s / 2)
    assert stats.num_running == 0


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_bad_timeout_header_is_a_400_naming_it(stack, value):
    status, reply, _, _ = post(stack, {"prompt": "x", "max_tokens": 2},
                               {TIMEOUT_HEADER: value})
    assert status == 400, reply
    assert_openai_error(reply, 400, "invalid_request_error")
    assert reply["error"]["param"] == TIMEOUT_HEADER and TIMEOUT_HEADER in reply["error"]["message"]


def listener_argv(address: str) -> list[str]:
    """The command line of the process listening on `address` (host:port)."""
    port = int(address.rsplit(":", 1)[1])
    (pid,) = {c.pid for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return psutil.Process(pid).cmdline()


def test_up_passes_the_overload_flags_on(stack):
    scheduler, gateway = listener_argv(stack.scheduler), listener_argv(stack.grpc)
    assert scheduler[scheduler.index("--max-queue-len") + 1] == str(MAX_QUEUE_LEN)
    assert gateway[gateway.index("--request-timeout") + 1] == "120.0"


class _Request:
    def __init__(self, headers: dict):
        self.headers = headers


@pytest.mark.parametrize("flag, header, expected", [
    (None, None, None), (30.0, None, 30.0), (None, "2.5", 2.5), (30.0, "2.5", 2.5),
    (2.0, "30", 2.0)])  # the header may shorten the gateway's limit, never lengthen it
def test_the_tighter_timeout_applies(flag, header, expected):
    deadline = request_deadline(_Request({} if header is None else {TIMEOUT_HEADER: header}),
                                flag)
    assert deadline.timeout_s == expected


def test_a_passed_deadline_is_a_504():
    deadline = request_deadline(_Request({TIMEOUT_HEADER: "0.001"}), None)
    time.sleep(0.01)
    with pytest.raises(GatewayError) as error:
        deadline.remaining()
    assert error.value.status == 504
