"""Entry point of `pagedserve executor`: loads the model, sizes and allocates the KV cache,
serves the Executor service (one long-lived Run stream of step plans, Describe, health) and
keeps itself registered with the scheduler.

On SIGTERM it drains: it stops heartbeating (so it never re-registers), finishes the step it is
running and ends its Run stream cleanly, which the scheduler takes as the executor handing its
requests back (they are recomputed on the other executors); then it exits 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from pagedserve.executor.bootstrap import build_runner, describe
from pagedserve.executor.config import EngineConfig
from pagedserve.executor.model_files import (
    ModelLoadError,
    default_cache_dir,
    resolve_model,
)
from pagedserve.executor.registration import keep_registered
from pagedserve.executor.runner import ModelRunner
from pagedserve.runtime.internal_auth import SESSION_HEADER, InternalAuth, Role, caller_policy
from pagedserve.runtime.log import configure_logging
from pagedserve.runtime.serving import (
    GrpcServer,
    StartupError,
    run_service,
    wait_for_stop_signal,
)
from pagedserve.v1 import executor_pb2, executor_pb2_grpc, scheduler_pb2

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
# Who may call what (runtime/internal_auth.py); every method of the service is listed.
CALLERS = caller_policy(SERVICE_NAME, {"Run": [Role.SCHEDULER], "Describe": [Role.SCHEDULER]})
# How long a draining executor waits for the step it is running before the server stops anyway.
DRAIN_TIMEOUT_S = 20.0

log = structlog.get_logger(__name__)


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    """`session_token`: the one this executor registers with; Run takes only streams that
    carry it (the scheduler it registered with). None for an executor that registers with no
    scheduler (tests and benchmarks drive it directly, as the scheduler role)."""

    def __init__(self, runner: ModelRunner, description: executor_pb2.DescribeResponse,
                 step_thread: ThreadPoolExecutor, session_token: str | None = None):
        self.runner = runner
        self._step_thread = step_thread
        self.description = description
        self._session_token = session_token
        # One Run stream at a time; a new one of the same session stops the previous one (the
        # scheduler reconnecting; see executor.proto).
        self._stream_lock = asyncio.Lock()
        self._stop_current: asyncio.Event | None = None
        self._draining = False

    async def Describe(self, request, context) -> executor_pb2.DescribeResponse:
        return self.description

    async def Run(self, plans: AsyncIterator[executor_pb2.StepPlan],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[executor_pb2.StepResult]:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the executor is shutting down")
        if not self._holds_session(context):
            log.warning("Run refused: not this executor's scheduler session",
                        peer=context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "Run takes only the scheduler this executor registered with "
                                "(metadata x-pagedserve-session)")
        if self._stop_current is not None:
            self._stop_current.set()
        stop = self._stop_current = asyncio.Event()
        async with self._stream_lock:
            self.runner.reset()
            log.info("scheduler stream opened", peer=context.peer())
            plan_iter = aiter(plans)
            while (plan := await _next_or_stop(plan_iter, stop)) is not None:
                yield await self._execute(plan)
            if stop.is_set() and not self._draining:
                await context.abort(grpc.StatusCode.ABORTED,
                                    "superseded by a newer Run stream")
            # Draining: a clean end of the stream hands every unfinished request back.
            log.info("scheduler stream closed", draining=self._draining)

    def _holds_session(self, context: grpc.aio.ServicerContext) -> bool:
        if self._session_token is None:
            return True
        presented = dict(context.invocation_metadata()).get(SESSION_HEADER, "")
        return hmac.compare_digest(presented.encode(), self._session_token.encode())

    async def drain(self, timeout_s: float) -> None:
        """Ends the Run stream after the step in progress and waits until it has ended (at most
        `timeout_s`), refusing new streams: the scheduler then recomputes this executor's
        requests elsewhere, before the server stops and would cut the stream mid-step."""
        self._draining = True
        if self._stop_current is not None:
            self._stop_current.set()
        try:
            await asyncio.wait_for(self._stream_lock.acquire(), timeout_s)
        except TimeoutError:
            log.warning("the step in progress did not end in time; stopping anyway",
                        timeout_s=timeout_s)
            return
        self._stream_lock.release()

    async def _execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        # Off the event loop, which keeps answering health checks and heartbeats.
        return await asyncio.get_running_loop().run_in_executor(
            self._step_thread, self.runner.step, plan)


async def _next_or_stop(plans: AsyncIterator, stop: asyncio.Event):
    """The next plan; None when the stream ends or `stop` is set first."""
    next_plan = asyncio.ensure_future(anext(plans))
    # If `stop` wins, the read's outcome (a plan, or the stream's end) is of no interest.
    next_plan.add_done_callback(lambda f: f.cancelled() or f.exception())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({next_plan, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        next_plan.cancel()
        return None
    try:
        return next_plan.result()
    except StopAsyncIteration:
        return None


async def serve(args: argparse.Namespace) -> None:
    # Before the slow model load: a bad flag fails at once.
    auth = InternalAuth.from_args(args, Role.EXECUTOR)
    config = EngineConfig.from_args(args)
    cache_dir = config.model_cache_dir or default_cache_dir()
    try:
        # In threads: converting a GGUF on first start and loading weights take seconds.
        model_dir = await asyncio.to_thread(resolve_model, config.model, cache_dir,
                                            config.served_model_name, config.gguf_dequantize)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    # The model is built and every step runs on this one thread: torch's OpenMP team belongs to
    # the thread that calls it, so steps hopping between pool threads would each start a team
    # (and keep its threads) on the first visit of a new thread.
    step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
    runner = await asyncio.get_running_loop().run_in_executor(
        step_thread, functools.partial(
            build_runner, config, model_dir,
            follower_log_flags=["--log-level", args.log_level, "--log-format", args.log_format]))
    description = describe(f"executor-{uuid.uuid4().hex[:12]}", model_dir, runner)

    server = GrpcServer(f"{args.host}:{args.port}", [auth.interceptor(CALLERS)],
                        auth.server_credentials())
    session_token = secrets.token_hex(32) if args.scheduler_address else None
    service = ExecutorService(runner, description, step_thread, session_token)
    executor_pb2_grpc.add_ExecutorServicer_to_server(service, server.server)
    await server.start([SERVICE_NAME])
    stop = asyncio.Event()
    registration = None
    if args.scheduler_address:
        registration = asyncio.create_task(keep_registered(
            args.scheduler_address,
            scheduler_pb2.RegisterExecutorRequest(
                executor_id=description.executor_id,
                address=args.advertise_address or f"{args.host}:{args.port}",
                model=description.model, kv_cache=description.kv_cache,
                limits=description.limits, parallel=description.parallel,
                session_token=session_token),
            stop, auth))
    stopping = asyncio.create_task(wait_for_stop_signal())
    await asyncio.wait({stopping, registration} - {None}, return_when=asyncio.FIRST_COMPLETED)
    if registration is not None and registration.done() and not stopping.done():
        _exit_refused(registration)
    stopping.cancel()
    stop.set()  # no more heartbeats: the scheduler must not take this executor back
    if registration is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await registration
    await service.drain(DRAIN_TIMEOUT_S)
    await server.stop()
    runner.close()
    step_thread.shutdown()


def _exit_refused(registration: asyncio.Task) -> None:
    """The registration loop ended by itself: the scheduler refused this executor for good
    (dropped as wedged; ExecutorRefused). Exit at once with status 1, without the graceful
    shutdown, whose drain would wait on the stuck step thread: the supervisor (`up`,
    Kubernetes) starts a fresh process, which registers under a new id."""
    error = registration.exception()
    log.error("the scheduler refused this executor; exiting for a restart", error=str(error))
    print(f"pagedserve executor: error: {error}", file=sys.stderr, flush=True)
    os._exit(1)


def main(args: argparse.Namespace) -> int:
    configure_logging("executor", args.log_level, args.log_format)
    return run_service("executor", lambda: serve(args))
