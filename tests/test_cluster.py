"""A cluster on one machine: gateway, scheduler and executors as separate processes (what the
Helm chart runs, minus Kubernetes) under a steady stream of requests, half through the OpenAI
HTTP API and half through the public gRPC API, while executors join, are killed, drain on
SIGTERM, and the scheduler restarts (issue 8).

Greedy decoding of a tiny float32 model is deterministic, so every request that completes must
carry exactly the output of the same prompt in a reference run without failures: the token ids
(gRPC) or the text (HTTP). The model's embeddings are untied, so its greedy output varies from
token to token instead of repeating the last prompt token: a recomputed request that lost,
repeated or mis-attended to a token would show. A request that does not complete must end with
a clear error, and none may hang (every call has a timeout, and a timeout fails the test).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest

from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import KEEPALIVE_S, KEEPALIVE_TIMEOUT_S, free_ports
from pagedserve.testing.processes import internal_auth, internal_channel
from pagedserve.testing.tiny_models import save_tiny_llama
from pagedserve.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow

CLIENTS = 6
CLIENT_TIMEOUT_S = 30.0
# A client whose request failed waits this long before the next one (no busy loop).
CLIENT_BACKOFF_S = 0.05
MAX_TOKENS = 24
# Distinct prompts (token ids) of a few lengths; clients cycle through them.
PROMPTS = [list(range(10 + 7 * i, 10 + 7 * i + 3 + 2 * (i % 4))) for i in range(8)]
API_NAMES = ("http", "grpc")
EXECUTOR_FLAGS = ("--device", "cpu", "--dtype", "float32", "--block-size", "4",
                  "--kv-cache-gib", "0.01", "--max-model-len", "128")


@dataclass
class Service:
    """One `pagedserve <command>` process, logging JSON lines to its own file."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> Service:
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pagedserve", *self.argv, "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class Cluster:
    model_dir: Path
    log_dir: Path
    services: list[Service] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.scheduler_port = free_ports(3)
        self.scheduler_address = f"127.0.0.1:{self.scheduler_port}"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.channel = internal_channel(self.scheduler_address, Role.GATEWAY)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)

    def _start(self, name: str, *argv: str) -> Service:
        service = Service(name, list(argv), self.log_dir / f"{name}.log").start()
        self.services.append(service)
        return service

    def start_scheduler(self) -> Service:
        return self._start("scheduler", "scheduler", "--port", str(self.scheduler_port),
                           "--heartbeat-interval", "0.5")

    def start_executor(self, index: int, *flags: str) -> Service:
        (port,) = free_ports(1)
        return self._start(f"executor-{index}", "executor", "--port", str(port),
                           "--model", str(self.model_dir), "--scheduler-address",
                           self.scheduler_address, *EXECUTOR_FLAGS, *flags)

    def start_gateway(self) -> Service:
        return self._start("gateway", "gateway", "--http-port", str(self.http_port),
                           "--grpc-port", str(self.grpc_port), "--scheduler-address",
                           self.scheduler_address)

    def executors(self) -> dict[str, scheduler_pb2.ExecutorStats]:
        """Registered executors by address; {} while the scheduler does not answer."""
        try:
            stats = self.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=2)
        except grpc.RpcError:
            return {}
        return {e.address: e for e in stats.executors}

    def ready_status(self) -> int:
        """HTTP status of the gateway's /ready (0 while it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/ready", timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def close(self) -> None:
        self.channel.close()
        for service in self.services:
            service.stop()


def address_of(executor: Service) -> str:
    return f"127.0.0.1:{executor.argv[executor.argv.index('--port') + 1]}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


@dataclass(frozen=True)
class Outcome:
    api: str  # "http" or "grpc"
    prompt: int
    # The text (HTTP) or token ids (gRPC) of a request that ran to max_tokens.
    output: str | tuple[int, ...] | None = None
    # A failed request: the HTTP status or gRPC code, and the message.
    status: str | None = None
    error: str | None = None


class Clients:
    """Greedy completions of PROMPTS[i] through either API; an error becomes an Outcome that
    names it, never an exception."""

    def __init__(self, cluster: Cluster):
        self.model = cluster.model_dir.name
        self.http = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused",
                                  timeout=CLIENT_TIMEOUT_S, max_retries=0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}")
        self.grpc = generation_pb2_grpc.GenerationStub(self.channel)

    def complete(self, api: str, prompt: int) -> Outcome:
        return self._http(prompt) if api == "http" else self._grpc(prompt)

    def _http(self, prompt: int) -> Outcome:
        try:
            reply = self.http.completions.create(
                model=self.model, prompt=PROMPTS[prompt], max_tokens=MAX_TOKENS,
                temperature=0, extra_body={"ignore_eos": True})
        except openai.APIStatusError as exc:
            return Outcome("http", prompt, status=str(exc.status_code), error=str(exc))
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            return Outcome("http", prompt, status=type(exc).__name__, error=str(exc))
        (choice,) = reply.choices
        assert choice.finish_reason == "length", choice
        return Outcome("http", prompt, output=choice.text)

    def _grpc(self, prompt: int) -> Outcome:
        request = generation_pb2.GenerateRequest(
            model=self.model, token_ids=common_pb2.TokenIds(ids=PROMPTS[prompt]),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                               ignore_eos=True))
        tokens, finish = [], common_pb2.FINISH_REASON_UNSPECIFIED
        try:
            for response in self.grpc.Generate(request, timeout=CLIENT_TIMEOUT_S):
                for choice in response.choices:
                    tokens += choice.token_ids
                    finish = choice.finish_reason or finish
        except grpc.RpcError as exc:
            return Outcome("grpc", prompt, status=exc.code().name, error=exc.details())
        assert finish == common_pb2.FINISH_REASON_LENGTH, finish
        return Outcome("grpc", prompt, output=tuple(tokens))

    def close(self) -> None:
        self.http.close()
        self.channel.close()


class Load:
    """CLIENTS threads sending requests back to back until stopped, half over each API."""

    def __init__(self, clients: Clients):
        self.clients = clients
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(CLIENTS)]

    def _client(self, index: int) -> None:
        api, prompt = API_NAMES[index % 2], index
        while not self._stop.is_set():
            outcome = self.clients.complete(api, prompt % len(PROMPTS))
            self.outcomes.append(outcome)
            if outcome.error is not None:
                self._stop.wait(CLIENT_BACKOFF_S)
            prompt += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CLIENT_TIMEOUT_S + 5)
            assert not thread.is_alive(), "a client hung"


def no_error_expected(outcome: Outcome) -> bool:
    return False


def scheduler_gone(outcome: Outcome) -> bool:
    """The clear errors of a request sent while the scheduler restarts: 503 / UNAVAILABLE
    naming the scheduler: unreachable, or (a call that reached the old scheduler in the instant
    its server began shutting down, which cancels it) ended early, to be retried."""
    return outcome.status in ("503", "UNAVAILABLE") and (
        "the scheduler is unreachable" in outcome.error
        or "the scheduler ended the request early" in outcome.error)


def assert_all_correct(outcomes: list[Outcome], reference: dict[tuple[str, int], object],
                       phase: str,
                       acceptable: Callable[[Outcome], bool] = no_error_expected) -> None:
    """Every request completed with the reference output, or failed with an acceptable
    error."""
    unclear = [o for o in outcomes if o.error is not None and not acceptable(o)]
    assert not unclear, f"{phase}: {len(unclear)} requests failed, e.g. {unclear[0]}"
    wrong = [o for o in outcomes if o.error is None and o.output != reference[o.api, o.prompt]]
    assert not wrong, f"{phase}: {len(wrong)} requests got other tokens, e.g. {wrong[0]}"


def reference_run(clients: Clients) -> dict[tuple[str, int], object]:
    """Each prompt once through each API, on the healthy cluster."""
    outcomes = [clients.complete(api, i) for api in API_NAMES for i in range(len(PROMPTS))]
    failed = [o for o in outcomes if o.error is not None]
    assert not failed, failed
    outputs = {(o.api, o.prompt): o.output for o in outcomes}
    token_runs = {outputs["grpc", i] for i in range(len(PROMPTS))}
    assert len(token_runs) == len(PROMPTS), "prompts should give distinct outputs"
    assert all(len(set(tokens)) > MAX_TOKENS // 3 for tokens in token_runs), \
        "greedy output should vary from token to token"
    return outputs


def kill_while_busy(cluster: Cluster, executor: Service, sig: signal.Signals) -> None:
    """Send `sig` at a moment the executor is running requests (mid-generation)."""
    address = address_of(executor)
    wait_until(lambda: cluster.executors().get(address, scheduler_pb2.ExecutorStats())
               .num_running > 0, 20, f"{executor.name} to run requests")
    executor.signal(sig)


def lost_reasons(scheduler: Service, executor: Service) -> list[str]:
    """Why the scheduler dropped `executor`, from its log lines."""
    prefix = f"{address_of(executor)}: "
    lines = [json.loads(line) for line in scheduler.log().splitlines() if line.startswith("{")]
    return [line["reason"].removeprefix(prefix) for line in lines
            if line["event"] == "executor lost; recomputing its requests elsewhere"
            and line["reason"].startswith(prefix)]


@pytest.fixture
def cluster(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama-untied", tie_word_embeddings=False)
    cluster = Cluster(model_dir, tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def clients(cluster):
    clients = Clients(cluster)
    yield clients
    clients.close()


def test_executors_join_die_drain_and_the_scheduler_restarts_under_load(cluster, clients):
    scheduler = cluster.start_scheduler()
    executors = [cluster.start_executor(i) for i in range(2)]
    cluster.start_gateway()
    wait_until(lambda: len(cluster.executors()) == 2, 120, "two executors to register", 0.2)
    wait_until(lambda: cluster.ready_status() == 200, 120, "the gateway to be ready", 0.2)

    reference = reference_run(clients)

    with Load(clients) as load:
        # (a) a third executor registers and takes new requests.
        executors.append(cluster.start_executor(2))
        wait_until(lambda: address_of(executors[2]) in cluster.executors(), 120,
                   "the third executor to register", 0.2)
        wait_until(lambda: cluster.executors()[address_of(executors[2])].num_running > 0, 20,
                   "the third executor to take requests")

        # (b) SIGKILL mid-generation: its requests are recomputed on the others.
        kill_while_busy(cluster, executors[0], signal.SIGKILL)
        wait_until(lambda: address_of(executors[0]) not in cluster.executors(), 10,
                   "the killed executor to be dropped")
        time.sleep(1.0)  # more traffic on the two left
    assert_all_correct(load.outcomes, reference, "join and SIGKILL")
    assert len(load.outcomes) > 3 * CLIENTS
    assert len(lost_reasons(scheduler, executors[0])) == 1

    # (d) the scheduler restarts: 503 while it is gone, executors re-register, requests succeed.
    with Load(clients) as load:
        scheduler.signal(signal.SIGTERM)
        assert scheduler.wait(timeout=30) == 0
        for api in API_NAMES:
            gone = clients.complete(api, 0)
            assert gone.status in ("503", "UNAVAILABLE") and scheduler_gone(gone), gone
        assert cluster.ready_status() == 503
        scheduler = cluster.start_scheduler()
        wait_until(lambda: len(cluster.executors()) == 2, 30, "executors to re-register", 0.2)
        wait_until(lambda: cluster.ready_status() == 200, 30, "the gateway to be ready again",
                   0.2)
        time.sleep(1.0)
    assert_all_correct(load.outcomes, reference, "scheduler restart", scheduler_gone)
    assert {o.api for o in load.outcomes if o.error} == set(API_NAMES)
    after_restart = [clients.complete(api, i) for api in API_NAMES for i in range(len(PROMPTS))]
    assert_all_correct(after_restart, reference, "after the scheduler restart")

    with Load(clients) as load:
        # (c) SIGTERM mid-generation: the executor hands its requests back and exits 0.
        kill_while_busy(cluster, executors[1], signal.SIGTERM)
        assert executors[1].wait(timeout=30) == 0
        assert address_of(executors[1]) not in cluster.executors()
        time.sleep(1.0)
    assert_all_correct(load.outcomes, reference, "SIGTERM")
    assert '"draining": true' in executors[1].log()
    # Dropped because its stream ended, not because its lease lapsed later. The end reads as a
    # clean EOF, or as INTERNAL when the scheduler's next plan races it (grpc/grpc#36066).
    assert lost_reasons(scheduler, executors[1]) in (["the executor ended its Run stream "
                                                      "(shutting down)"],
                                                     ["INTERNAL: Internal error from Core"])


@dataclass(frozen=True)
class Streamed:
    outcome: Outcome
    # Seconds between the chunk the stream had when the scheduler was killed and the next.
    pause_s: float
    # Whether the stream had started, and not finished, when the scheduler was killed.
    in_flight: bool


class StreamingClient(threading.Thread):
    """One streamed greedy completion of PROMPTS[prompt] (HTTP server-sent events or the gRPC
    stream), recording when each chunk arrives."""

    def __init__(self, clients: Clients, api: str, prompt: int, max_tokens: int):
        super().__init__()
        self.clients, self.api, self.prompt, self.max_tokens = clients, api, prompt, max_tokens
        self.arrivals: list[float] = []
        self.started = threading.Event()
        self.outcome: Outcome | None = None

    def run(self) -> None:
        try:
            self.outcome = self._http() if self.api == "http" else self._grpc()
        except (openai.APIError, grpc.RpcError) as exc:
            status = getattr(exc, "status_code", None) or getattr(exc, "code", lambda: "?")()
            self.outcome = Outcome(self.api, self.prompt, status=str(status), error=str(exc))
        finally:
            self.started.set()

    def _chunk(self) -> None:
        self.arrivals.append(time.monotonic())
        self.started.set()

    def _http(self) -> Outcome:
        text = ""
        for chunk in self.clients.http.completions.create(
                model=self.clients.model, prompt=PROMPTS[self.prompt], stream=True,
                max_tokens=self.max_tokens, temperature=0, extra_body={"ignore_eos": True}):
            self._chunk()
            text += "".join(choice.text for choice in chunk.choices)
        return Outcome("http", self.prompt, output=text)

    def _grpc(self) -> Outcome:
        request = generation_pb2.GenerateRequest(
            model=self.clients.model, token_ids=common_pb2.TokenIds(ids=PROMPTS[self.prompt]),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=self.max_tokens,
                                               ignore_eos=True))
        tokens = []
        for response in self.clients.grpc.Generate(request, timeout=CLIENT_TIMEOUT_S * 2):
            self._chunk()
            tokens += [t for choice in response.choices for t in choice.token_ids]
        return Outcome("grpc", self.prompt, output=tuple(tokens))

    def streamed(self, killed_at: float) -> Streamed:
        before = [t for t in self.arrivals if t <= killed_at]
        after = [t for t in self.arrivals if t > killed_at]
        pause = after[0] - before[-1] if before and after else 0.0
        return Streamed(self.outcome, pause, bool(before and after))


def test_a_scheduler_killed_mid_stream_loses_no_stream(cluster, clients):
    """SIGKILL of the scheduler while streams run over both APIs, restarted on its address: the
    gateway resubmits each request with what it streamed, and every stream ends with exactly
    the tokens of an undisturbed run, with no error (issue 17)."""
    max_tokens = 100  # long enough that every stream is still running when the kill lands
    scheduler = cluster.start_scheduler()
    cluster.start_executor(0)
    cluster.start_gateway()
    wait_until(lambda: len(cluster.executors()) == 1, 120, "the executor to register", 0.2)
    wait_until(lambda: cluster.ready_status() == 200, 120, "the gateway to be ready", 0.2)
    reference = streamed_reference(clients, max_tokens)

    streams = started_streams(clients, max_tokens)
    scheduler.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    scheduler.wait(timeout=10)
    time.sleep(0.5)  # gone for a while, as a restart under a supervisor is
    cluster.start_scheduler()
    for stream in streams:
        stream.join(timeout=CLIENT_TIMEOUT_S * 2)
        assert not stream.is_alive(), "a client hung"
    results = [stream.streamed(killed_at) for stream in streams]
    assert_all_correct([r.outcome for r in results], reference, "scheduler SIGKILL")
    cut = {r.outcome.api for r in results if r.in_flight}
    assert cut == set(API_NAMES), "the kill should land mid-stream on both APIs"
    longest = max(r.pause_s for r in results)
    print(f"longest pause a client saw across the scheduler restart: {longest:.2f} s "
          f"({sum(r.in_flight for r in results)} of {len(results)} streams cut mid-way)")
    assert longest < CLIENT_TIMEOUT_S  # generous: the restart itself takes seconds


def streamed_reference(clients: Clients, max_tokens: int) -> dict[tuple[str, int], object]:
    """Each prompt streamed once through each API, undisturbed."""
    reference = {}
    for api in API_NAMES:
        for prompt in range(len(PROMPTS)):
            client = StreamingClient(clients, api, prompt, max_tokens)
            client.run()
            assert client.outcome.error is None, client.outcome
            reference[api, prompt] = client.outcome.output
    assert len({reference["grpc", i] for i in range(len(PROMPTS))}) == len(PROMPTS)
    return reference


def started_streams(clients: Clients, max_tokens: int) -> list[StreamingClient]:
    """A stream of each prompt through each API, each under way."""
    streams = [StreamingClient(clients, api, prompt, max_tokens)
               for api in API_NAMES for prompt in range(len(PROMPTS))]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60), "a stream did not start"
    return streams


def test_speculating_executors_stream_what_plain_ones_do_through_a_kill(cluster, clients):
    """Streams over both APIs from two speculating executors, one by prompt lookup and one
    with the model as its own draft, while the first is SIGKILLed mid-stream: every stream
    ends with exactly the tokens a plain executor streamed, and the drafting executor, left
    alone with them, accepted proposals (issue 20)."""
    max_tokens = 60
    scheduler = cluster.start_scheduler()
    plain = cluster.start_executor(0)
    cluster.start_gateway()
    wait_until(lambda: len(cluster.executors()) == 1, 120, "the executor to register", 0.2)
    wait_until(lambda: cluster.ready_status() == 200, 120, "the gateway to be ready", 0.2)
    reference = streamed_reference(clients, max_tokens)
    plain.signal(signal.SIGTERM)
    assert plain.wait(timeout=30) == 0

    ngram = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})
    draft = json.dumps({"model": str(cluster.model_dir), "num_speculative_tokens": 3})
    looking_up = cluster.start_executor(1, "--speculative-config", ngram)
    cluster.start_executor(2, "--speculative-config", draft)
    wait_until(lambda: len(cluster.executors()) == 2, 120, "two executors to register", 0.2)
    streams = started_streams(clients, max_tokens)
    kill_while_busy(cluster, looking_up, signal.SIGKILL)
    for stream in streams:
        stream.join(timeout=CLIENT_TIMEOUT_S * 2)
        assert not stream.is_alive(), "a client hung"
    assert_all_correct([stream.outcome for stream in streams], reference, "speculation")
    assert len(lost_reasons(scheduler, looking_up)) == 1  # its requests were recomputed
    stats = cluster.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
    assert 0 < stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens


def test_a_call_to_a_frozen_scheduler_fails_instead_of_hanging(cluster):
    """A scheduler that stops answering without closing its connections (a dead node, here a
    SIGSTOPped process) fails the calls waiting on it with UNAVAILABLE once a keepalive ping
    goes unanswered, instead of leaving them hanging until TCP gives up (issue 17)."""
    scheduler = cluster.start_scheduler()
    wait_until(lambda: _answers(cluster), 60, "the scheduler to answer", 0.2)

    async def submit_and_wait():
        async with internal_auth(Role.GATEWAY).channel(cluster.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            # No executor is registered: the request waits in the scheduler, its stream idle.
            call = stub.Submit(scheduler_pb2.SubmitRequest(prompt_token_ids=[1, 2, 3]))
            await asyncio.sleep(1.0)
            scheduler.signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await asyncio.wait_for(call.read(), KEEPALIVE_S + KEEPALIVE_TIMEOUT_S + 20)
            return error.value.code(), time.monotonic() - started
    try:
        code, waited = asyncio.run(submit_and_wait())
    finally:
        scheduler.signal(signal.SIGCONT)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert waited < KEEPALIVE_S + KEEPALIVE_TIMEOUT_S + 5


def _answers(cluster) -> bool:
    try:
        cluster.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True
