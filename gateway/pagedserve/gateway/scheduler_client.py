"""The gateway's side of the Scheduler service: the served model (and its tokenizer, relayed
from an executor), token streams, and stats. Scheduler errors become `GatewayError`s carrying
the HTTP status and OpenAI error type the API answers with.

A token stream outlives its scheduler: when the scheduler goes away mid-request, the request is
resubmitted with what its caller has received, and the stream goes on where it was
(docs/architecture.md, "Scheduler restart")."""

from __future__ import annotations

import asyncio
import math
import pathlib
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
import structlog

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.tokenizer import load_tokenizer, tokenizer_from_files
from pagedserve.runtime.internal_auth import InternalAuth
from pagedserve.runtime.resume import FINAL_HEADER, QUEUED_HEADER
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger(__name__)

# Seconds to wait for the scheduler to answer a unary call; a stream waits for its tokens.
UNARY_TIMEOUT_S = 10.0

# How a queued request's stream breaks when its scheduler goes away: UNAVAILABLE (the process
# died, its connection was cut, a keepalive went unanswered) or CANCELLED (it shut down with the
# call open; the gateway never cancels a call it still reads). Anything else, or a status the
# scheduler marks final (runtime/resume.py), is the request's own error, and is the client's.
SCHEDULER_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# Seconds a request whose scheduler went away keeps trying to resubmit itself (within its own
# deadline): enough for `up` or Kubernetes to restart a scheduler, not so long that a dead
# deployment holds streams open for minutes. Then it ends with 503, as it did before resuming.
RESUME_WINDOW_S = 30.0
# Resubmission backoff: from the first delay, doubling, up to the cap (each jittered down by up
# to half, so that a gateway's requests do not all arrive in the same instant).
RESUME_BACKOFF_S = (0.05, 1.0)
# A request that loses its scheduler this many times fails (503) instead of being resubmitted
# again: it may be what brings the scheduler down.
MAX_SCHEDULER_LOSSES = 3
# A channel whose reconnection is in backoff is replaced at most this often (see _reconnect).
RECONNECT_INTERVAL_S = 0.25

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    # The gateway never cancels a call it still answers, so a CANCELLED reaching a client came
    # from the scheduler's side (it was shutting down): as retryable as UNAVAILABLE.
    grpc.StatusCode.CANCELLED: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


_SAMPLING_FIELD = re.compile(r"sampling\.(\w+):")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> GatewayError:
    status, error_type = _STATUS.get(exc.code(), (500, "internal_error"))
    message = exc.details() or exc.code().name
    param = None
    if exc.code() is grpc.StatusCode.UNAVAILABLE and "connect" in message.lower():
        message = f"the scheduler is unreachable ({message})"
    elif exc.code() is grpc.StatusCode.CANCELLED:
        message = f"the scheduler ended the request early ({message}); retry"
    elif exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
        # Admission names the field by its path in SubmitRequest; a sampling field's name is
        # the public APIs' name for it too.
        field = _SAMPLING_FIELD.match(message)
        param = field[1] if field else None
    return GatewayError(status, message, error_type, param)


@dataclass(frozen=True)
class Deadline:
    """When a request must be over (time.monotonic()), or never (None). Travels to the
    scheduler as the Submit call's gRPC deadline, so the scheduler aborts the request (and
    frees its blocks) when it passes."""

    at: float | None = None
    timeout_s: float | None = None

    @classmethod
    def after(cls, *timeouts_s: float | None) -> Deadline:
        """The tightest of `timeouts_s` from now (None among them: no bound); none: never."""
        timeout_s = min((t for t in timeouts_s if t is not None), default=None)
        if timeout_s is None:
            return cls()
        return cls(time.monotonic() + timeout_s, timeout_s)

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); raises the 504 once it has passed."""
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.exceeded()
        return left

    def exceeded(self) -> GatewayError:
        return GatewayError(504, f"the request did not finish within its timeout of "
                                 f"{self.timeout_s:g} s and was aborted", "timeout")


NO_DEADLINE = Deadline()


def parse_timeout(value: str, param: str) -> float:
    """A client-given timeout in seconds: a finite number > 0, or a 400 naming `param`."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise GatewayError(400, f"{param}: expected a number of seconds > 0, got {value!r}",
                           "invalid_request_error", param)
    return seconds


@dataclass
class ServedModel:
    info: common_pb2.ModelInfo
    tokenizer: object  # a transformers tokenizer
    # The serving executor's limits (e.g. its --max-logprobs), which requests are checked against.
    limits: common_pb2.ExecutorLimits = field(default_factory=common_pb2.ExecutorLimits)


@dataclass
class _Stream:
    """One request as its caller has received it, enough to resubmit it to a scheduler that
    lost it (SubmitRequest.resumed_sequences): each sequence's output tokens and whether it
    ended. Tokens are counted as they are handed on, so a resubmission resumes exactly after
    the last token the caller has: no gap, no duplicate."""

    request: scheduler_pb2.SubmitRequest
    outputs: list[list[int]]
    finished: list[bool]
    received: bool = False  # any delta: the first one's fields (usage, prompt logprobs) are out
    # A scheduler took the request (Submit's initial metadata): its stream is in flight, and a
    # scheduler going away is resumed from then on, instead of failing at once.
    queued: bool = False
    attempt: int = 0
    losses: int = 0  # schedulers lost while they held the request
    # When the scheduler holding it last went away, and the attempts that failed since.
    lost_at: float | None = None
    failed_attempts: int = 0

    @classmethod
    def of(cls, request: scheduler_pb2.SubmitRequest) -> _Stream:
        n = max(1, request.sampling.n)
        return cls(request, [[] for _ in range(n)], [False] * n)

    @property
    def scheduler_id(self) -> str:
        """The id of this attempt: a fresh one per resubmission, so a scheduler that still holds
        the last attempt (the connection broke, the process lives) never answers ALREADY_EXISTS;
        the stale one is aborted when that scheduler sees its call cancelled."""
        if not self.attempt:
            return self.request.request_id
        return f"{self.request.request_id}.resume{self.attempt}"

    def accept(self, delta: scheduler_pb2.TokenDelta) -> None:
        self.received = True
        if not self.finished[delta.seq_index]:
            self.outputs[delta.seq_index].extend(delta.token_ids)
            self.finished[delta.seq_index] = bool(delta.finish_reason)

    def submission(self) -> scheduler_pb2.SubmitRequest:
        submit = scheduler_pb2.SubmitRequest()
        submit.CopyFrom(self.request)
        submit.request_id = self.scheduler_id
        if self.received:
            for outputs, finished in zip(self.outputs, self.finished, strict=True):
                submit.resumed_sequences.add(output_token_ids=outputs, finished=finished)
        return submit


class SchedulerClient:
    def __init__(self, address: str, auth: InternalAuth, tokenizer_path: str | None = None):
        self.address = address
        self.tokenizer_path = tokenizer_path
        self._auth = auth
        self._open_channel()
        self._models: dict[str, ServedModel] = {}
        self._loading = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them
        # Open token streams by the gateway's request id (stop_sequence reaches the attempt).
        self._streams: dict[str, _Stream] = {}

    def _open_channel(self) -> None:
        self._channel = self._auth.channel(self.address)
        self._channel_opened = time.monotonic()
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def model(self, name: str = "") -> ServedModel:
        """The served model `name` ("" = the only one), its tokenizer built once."""
        if name in self._models:
            return self._models[name]
        # One load at a time: concurrent first requests would each build the tokenizer, and
        # transformers' lazy imports are not thread-safe (ImportError under a burst).
        async with self._loading:
            if name not in self._models:
                await self._load_model(name)
        return self._models[name]

    async def _load_model(self, name: str) -> None:
        try:
            reply = await self._stub.GetModel(scheduler_pb2.GetModelRequest(model=name),
                                              timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if error.status == 404:
                error.param = "model"
            raise error from None
        tokenizer = await asyncio.to_thread(self._load_tokenizer, reply.tokenizer.files)
        served = ServedModel(info=reply.model, tokenizer=tokenizer, limits=reply.limits)
        self._models[name] = self._models[reply.model.model_id] = served

    def _load_tokenizer(self, files: Mapping[str, bytes]):
        if self.tokenizer_path:
            return load_tokenizer(pathlib.Path(self.tokenizer_path))
        return tokenizer_from_files(files)

    async def generate(self, request: scheduler_pb2.SubmitRequest,
                       deadline: Deadline = NO_DEADLINE
                       ) -> AsyncIterator[scheduler_pb2.TokenDelta]:
        """The request's token deltas; leaving the iteration early (client gone, stop string)
        cancels the call, which aborts the request on the scheduler. When the scheduler goes
        away after queueing the request, it is resubmitted (`_resume_or_raise`) and the deltas
        go on where they were."""
        stream = self._streams[request.request_id] = _Stream.of(request)
        try:
            while not all(stream.finished):
                try:
                    async for delta in self._attempt(stream, deadline):
                        yield delta
                    return
                except grpc.aio.AioRpcError as exc:
                    await self._resume_or_raise(stream, exc, deadline)
        finally:
            del self._streams[request.request_id]

    async def _attempt(self, stream: _Stream, deadline: Deadline
                       ) -> AsyncIterator[scheduler_pb2.TokenDelta]:
        """One Submit call of the stream: its deltas, each counted before it is handed on."""
        channel = self._channel
        call = self._stub.Submit(stream.submission(), timeout=deadline.remaining())
        try:
            async for delta in call:
                stream.accept(delta)
                yield delta
        except grpc.aio.AioRpcError:
            if QUEUED_HEADER in dict(await call.initial_metadata() or ()):
                stream.queued = True
                stream.losses += 1
                stream.lost_at, stream.failed_attempts = time.monotonic(), 0
            self._reconnect(channel)
            raise
        finally:
            call.cancel()

    async def _resume_or_raise(self, stream: _Stream, exc: grpc.aio.AioRpcError,
                               deadline: Deadline) -> None:
        """Waits out the backoff before the stream's next attempt, or raises what its client
        gets: the error itself unless the scheduler went away after queueing the request; 503
        once the request has lost MAX_SCHEDULER_LOSSES schedulers or no scheduler took it back
        within RESUME_WINDOW_S (or before its deadline)."""
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and deadline.at is not None:
            raise deadline.exceeded() from None
        if not (stream.queued and exc.code() in SCHEDULER_GONE) or \
                FINAL_HEADER in dict(exc.trailing_metadata() or ()):
            raise from_rpc_error(exc) from None
        if stream.losses >= MAX_SCHEDULER_LOSSES:
            raise GatewayError(503, f"the request lost its scheduler {stream.losses} times; "
                                    "it is not resubmitted again", "service_unavailable")
        first, cap = RESUME_BACKOFF_S
        delay = min(cap, first * 2 ** stream.failed_attempts) * random.uniform(0.5, 1.0)
        give_up = stream.lost_at + RESUME_WINDOW_S
        if deadline.at is not None:
            give_up = min(give_up, deadline.at)
        if time.monotonic() + delay >= give_up:
            raise GatewayError(503, f"the scheduler went away mid-request and did not take it "
                                    f"back within {time.monotonic() - stream.lost_at:.1f} s "
                                    f"({exc.details() or exc.code().name})",
                               "service_unavailable") from None
        # Once per loss: the attempts while the scheduler is down are many and alike.
        report = log.warning if not stream.failed_attempts else log.debug
        report("scheduler gone; resubmitting the request", request_id=stream.request.request_id,
               attempt=stream.attempt + 1, code=exc.code().name, error=exc.details(),
               output_tokens=[len(o) for o in stream.outputs])
        stream.failed_attempts += 1
        stream.attempt += 1
        await asyncio.sleep(delay)

    def _reconnect(self, failed: grpc.aio.Channel) -> None:
        """Replaces the channel a call just failed on when it waits out a reconnection backoff
        (TRANSIENT_FAILURE): gRPC's backoff grows to minutes, and calls fail at once until it
        ends, so a restarted scheduler would be found seconds late. A fresh channel connects at
        once, as the executors' fresh channel per registration attempt does. The old one is
        closed once its calls are done."""
        if (failed is not self._channel
                or time.monotonic() - self._channel_opened < RECONNECT_INTERVAL_S
                or failed.get_state() is not grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            return
        self._open_channel()
        self._in_background(failed.close(grace=UNARY_TIMEOUT_S))

    def _in_background(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        """Tells the scheduler, without waiting, that one sequence of a request is done (a
        stop string matched). It only spares the scheduler work: the stream ignores whatever
        the sequence still sends, so a failure here is logged, not raised. A resubmission
        does not run the sequence again."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished[seq_index] = True
            request_id = stream.scheduler_id
        self._in_background(self._stop_sequence(request_id, seq_index))

    async def _stop_sequence(self, request_id: str, seq_index: int) -> None:
        try:
            await self._stub.StopSequence(scheduler_pb2.StopSequenceRequest(
                request_id=request_id, seq_index=seq_index), timeout=UNARY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not stop a sequence on the scheduler", request_id=request_id,
                        seq_index=seq_index, error=exc.details())

    async def stats(self, timeout: float = UNARY_TIMEOUT_S) -> scheduler_pb2.SchedulerStats:
        try:
            return await self._stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
