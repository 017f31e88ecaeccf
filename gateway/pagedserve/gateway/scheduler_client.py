"""The gateway's side of the Scheduler service: the served model (and its tokenizer, relayed
from an executor), token streams, and stats. Scheduler errors become `GatewayError`s carrying
the HTTP status and OpenAI error type the API answers with."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
import structlog

from pagedserve.gateway.errors import GatewayError
from pagedserve.runtime.internal_auth import InternalAuth
from pagedserve.runtime.tokenizer_files import check_tokenizer_files
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

log = structlog.get_logger(__name__)

# Seconds to wait for the scheduler to answer a unary call; a stream waits for its tokens.
UNARY_TIMEOUT_S = 10.0

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


def from_rpc_error(exc: grpc.aio.AioRpcError) -> GatewayError:
    status, error_type = _STATUS.get(exc.code(), (500, "internal_error"))
    message = exc.details() or exc.code().name
    if exc.code() is grpc.StatusCode.UNAVAILABLE and "connect" in message.lower():
        message = f"the scheduler is unreachable ({message})"
    elif exc.code() is grpc.StatusCode.CANCELLED:
        message = f"the scheduler ended the request early ({message}); retry"
    return GatewayError(status, message, error_type)


@dataclass(frozen=True)
class Deadline:
    """When a request must be over (time.monotonic()), or never (None). Travels to the
    scheduler as the Submit call's gRPC deadline, so the scheduler aborts the request (and
    frees its blocks) when it passes."""

    at: float | None = None
    timeout_s: float | None = None

    @classmethod
    def after(cls, timeout_s: float | None) -> Deadline:
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


def load_tokenizer(directory: pathlib.Path):
    """The tokenizer in `directory`, of the class its tokenizer_config.json names, loaded
    without torch: transformers' AutoTokenizer reads the model config, whose module imports
    torch (its cost for a gateway: docs/architecture.md, "The gateway"), while a tokenizer
    class's own module does not. Its Fast variant where transformers has one, as
    AutoTokenizer would choose. AutoTokenizer where the file names no class
    transformers has; an error where it names another kind of class (AutoTokenizer would
    instantiate it: a model class loads weights)."""
    import transformers  # heavy; only once per model

    config = directory / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    # the Fast class first, as AutoTokenizer picks it (transformers 4.x names the slow Python
    # one plainly; 5.x makes both names one class)
    cls = (getattr(transformers, name + "Fast", None) or getattr(transformers, name, None)) \
        if isinstance(name, str) else None
    if cls is None:
        return transformers.AutoTokenizer.from_pretrained(directory)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise ValueError(f"tokenizer_config.json: tokenizer_class {name!r} is not a tokenizer "
                         "class")
    return cls.from_pretrained(directory)


def tokenizer_from_files(files: Mapping[str, bytes]):
    """The tokenizer an executor relayed (file name to bytes), written to a temporary directory
    and loaded from it. The names come from another process: they are checked before anything
    is written (runtime/tokenizer_files.py)."""
    try:
        check_tokenizer_files(files)
    except ValueError as exc:
        raise GatewayError(500, f"the executor relayed an unusable tokenizer: {exc}",
                           "internal_error") from None
    with tempfile.TemporaryDirectory(prefix="pagedserve-tokenizer-") as directory:
        for name, content in files.items():
            (pathlib.Path(directory) / name).write_bytes(content)
        return load_tokenizer(pathlib.Path(directory))


class SchedulerClient:
    def __init__(self, address: str, auth: InternalAuth, tokenizer_path: str | None = None):
        self.address = address
        self.tokenizer_path = tokenizer_path
        self._channel = auth.channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._models: dict[str, ServedModel] = {}
        self._loading = asyncio.Lock()
        self._background: set[asyncio.Task] = set()  # held so the loop does not drop them

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
        cancels the call, which aborts the request on the scheduler."""
        call = self._stub.Submit(request, timeout=deadline.remaining())
        try:
            async for delta in call:
                yield delta
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and deadline.at is not None:
                raise deadline.exceeded() from None
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        """Tells the scheduler, without waiting, that one sequence of a request is done (a
        stop string matched). It only spares the scheduler work: the stream ignores whatever
        the sequence still sends, so a failure here is logged, not raised."""
        task = asyncio.ensure_future(self._stop_sequence(request_id, seq_index))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
