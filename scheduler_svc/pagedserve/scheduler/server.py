"""Entry point of `pagedserve scheduler`: the Scheduler gRPC service over the cluster of
registered executors (docs/design.md §2)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from pagedserve.runtime.internal_auth import InternalAuth, Role, caller_policy
from pagedserve.runtime.log import configure_logging
from pagedserve.runtime.request_rules import RuleError, check_request_id
from pagedserve.runtime.resume import FINAL_METADATA, QUEUED_METADATA
from pagedserve.runtime.serving import GrpcServer, run_service, wait_for_stop_signal
from pagedserve.scheduler.admission import AdmissionError, QueueFull, check_queue_room
from pagedserve.scheduler.cluster import (
    Cluster,
    ClusterConfig,
    DuplicateRequest,
    ExecutorWedged,
    RegistrationConflict,
    Submission,
    UnknownModel,
)
from pagedserve.scheduler.executor_handle import GrpcExecutorHandle
from pagedserve.scheduler.executor_pool import DescriptionError
from pagedserve.scheduler.pool_loop import Overlap
from pagedserve.v1 import executor_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
# Who may call what (runtime/internal_auth.py); every method of the service is listed.
CALLERS = caller_policy(SERVICE_NAME, {
    "Submit": [Role.GATEWAY], "StopSequence": [Role.GATEWAY], "GetStats": [Role.GATEWAY],
    "GetModel": [Role.GATEWAY], "RegisterExecutor": [Role.EXECUTOR],
    "Heartbeat": [Role.EXECUTOR]})
EXPIRY_CHECK_S = 0.5
# Why a registration is refused -> its status. FAILED_PRECONDITION tells a wedged executor to
# exit, so that its supervisor (up, Kubernetes) restarts it (executor/registration.py).
REGISTRATION_REFUSALS = {DescriptionError: grpc.StatusCode.INVALID_ARGUMENT,
                         RegistrationConflict: grpc.StatusCode.ALREADY_EXISTS,
                         ExecutorWedged: grpc.StatusCode.FAILED_PRECONDITION}

log = structlog.get_logger(__name__)


def num_waiting(cluster: Cluster) -> int:
    """Sequences queued on every executor, plus requests waiting for an executor."""
    return sum(len(p.scheduler.waiting) for p in cluster.pools.values()) + len(cluster.orphans)


async def next_event(events: asyncio.Queue, deadline: float | None):
    """The request's next event; None once its deadline (time.monotonic()) has passed."""
    if deadline is None:
        return await events.get()
    try:
        return await asyncio.wait_for(events.get(), deadline - time.monotonic())
    except TimeoutError:
        return None


async def check_id(request_id: str, context: grpc.aio.ServicerContext) -> None:
    """Aborts with INVALID_ARGUMENT unless `request_id` is a well-formed id (request_rules):
    it keys the request's state and lands in every log line."""
    try:
        check_request_id(request_id)
    except RuleError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cluster: Cluster, auth: InternalAuth, max_queue_len: int = 0):
        self.cluster = cluster
        self.auth = auth
        self.max_queue_len = max_queue_len

    async def Submit(self, request: scheduler_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[scheduler_pb2.TokenDelta]:
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        await check_id(request_id, context)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.monotonic()
        # The caller's gRPC deadline bounds the request's whole life, queueing included; the
        # request is aborted here when it passes, not only abandoned by the caller.
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        events: asyncio.Queue = asyncio.Queue()
        resumed = tuple(request.resumed_sequences)
        submission = Submission(request_id, list(request.prompt_token_ids), request.sampling,
                                request.priority, events.put_nowait, request.cache_salt,
                                resumed)
        try:
            if not resumed:  # a resubmission was admitted once: refusing it breaks a stream
                check_queue_room(num_waiting(self.cluster), self.max_queue_len)
            self.cluster.submit(request.model, submission,
                                fail=lambda code, message: events.put_nowait((code, message)))
        except QueueFull as exc:
            log.warning("request refused: queue full", error=str(exc))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except AdmissionError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except DuplicateRequest as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        log.info("request queued", prompt_tokens=len(request.prompt_token_ids),
                 resumed_output_tokens=[len(r.output_token_ids) for r in resumed])
        unfinished = set(range(max(1, request.sampling.n))) - {
            i for i, entry in enumerate(resumed) if entry.finished}
        try:
            # Queued: from now on a broken stream is resubmitted (runtime/resume.py).
            await context.send_initial_metadata(QUEUED_METADATA)
            while unfinished:
                event = await next_event(events, deadline)
                if event is None:
                    log.info("deadline passed; request aborted")
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"the request's deadline passed after "
                                        f"{time.monotonic() - started:.2f} s; it was aborted")
                if isinstance(event, tuple):  # the request's own end: not resubmitted
                    code, message = event
                    await context.abort(getattr(grpc.StatusCode, code), message, FINAL_METADATA)
                if event.finish_reason:
                    unfinished.discard(event.seq_index)
                yield event
        finally:
            # Completed, cancelled by the client, or failed: free what is left now.
            self.cluster.finished(request_id)
            log.info("request done", cancelled=bool(unfinished))

    async def StopSequence(self, request: scheduler_pb2.StopSequenceRequest,
                           context) -> scheduler_pb2.StopSequenceResponse:
        await check_id(request.request_id, context)
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        self.cluster.stop_sequence(request.request_id, request.seq_index)
        log.info("sequence stopped by the gateway", seq_index=request.seq_index)
        return scheduler_pb2.StopSequenceResponse()

    async def GetStats(self, request, context) -> scheduler_pb2.SchedulerStats:
        stats = scheduler_pb2.SchedulerStats()
        for pool in self.cluster.pools.values():
            scheduler, blocks = pool.scheduler, pool.scheduler.blocks
            stats.num_running += len(scheduler.running)
            stats.num_steps += scheduler.counters.steps
            stats.num_preemptions += scheduler.counters.preemptions
            stats.spec_decode_num_drafts += scheduler.counters.speculative_decodes
            stats.spec_decode_num_draft_tokens += scheduler.counters.draft_tokens
            stats.spec_decode_num_accepted_tokens += scheduler.counters.accepted_tokens
            stats.prefix_cache_queried_tokens += blocks.stats.queried_tokens
            stats.prefix_cache_hit_tokens += blocks.stats.hit_tokens
            stats.executors.add(
                executor_id=pool.executor_id, address=pool.registration.address,
                model_id=pool.model_id, total_blocks=blocks.num_blocks,
                free_blocks=blocks.num_free_blocks,
                cached_free_blocks=blocks.num_cached_free_blocks,
                num_running=len(scheduler.running),
                seconds_since_progress=pool.loop.seconds_since_progress(),
                weight_bytes=pool.registration.model.weight_bytes,
                kv_cache_bytes=blocks.num_blocks * pool.registration.kv_cache.bytes_per_block,
                quantization=pool.registration.model.quantization,
                kv_cache_dtype=pool.registration.kv_cache.dtype)
        stats.num_waiting = num_waiting(self.cluster)
        return stats

    async def GetModel(self, request, context) -> scheduler_pb2.GetModelResponse:
        try:
            model = self.cluster.resolve_model(request.model)
        except UnknownModel as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        pool = next((p for p in self.cluster.pools.values() if p.model_id == model), None)
        if pool is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no executor is registered")
        async with self.auth.channel(pool.registration.address) as channel:
            description = await executor_pb2_grpc.ExecutorStub(channel).Describe(
                executor_pb2.DescribeRequest(), timeout=10)
        return scheduler_pb2.GetModelResponse(model=description.model,
                                              tokenizer=description.tokenizer,
                                              limits=pool.registration.limits)

    async def RegisterExecutor(self, request, context):
        try:
            self.cluster.register(request)
        except tuple(REGISTRATION_REFUSALS) as exc:
            log.warning("registration refused", executor_id=request.executor_id[:64],
                        peer=context.peer(), error=str(exc))
            await context.abort(REGISTRATION_REFUSALS[type(exc)], str(exc))
        return scheduler_pb2.RegisterExecutorResponse(
            heartbeat_interval_s=self.cluster.config.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        return scheduler_pb2.HeartbeatResponse(
            registered=self.cluster.heartbeat(request.executor_id, request.session_token))


async def _expire_forever(cluster: Cluster) -> None:
    while True:
        await asyncio.sleep(EXPIRY_CHECK_S)
        cluster.expire()


async def serve(args: argparse.Namespace) -> None:
    auth = InternalAuth.from_args(args, Role.SCHEDULER)
    cluster = Cluster(ClusterConfig(overlap=Overlap.NEVER if args.no_overlap else Overlap.AUTO,
                                    enable_prefix_caching=not args.no_prefix_caching,
                                    heartbeat_interval_s=args.heartbeat_interval,
                                    no_executor_timeout_s=args.no_executor_timeout,
                                    step_timeout_s=args.step_timeout),
                      make_handle=functools.partial(GrpcExecutorHandle, auth=auth))
    server = GrpcServer(f"{args.host}:{args.port}", [auth.interceptor(CALLERS)],
                        auth.server_credentials())
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        SchedulerService(cluster, auth, args.max_queue_len), server.server)
    await server.start([SERVICE_NAME])
    expiry = asyncio.create_task(_expire_forever(cluster))
    await wait_for_stop_signal()
    expiry.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await expiry
    await server.stop()


def main(args: argparse.Namespace) -> int:
    configure_logging("scheduler", args.log_level, args.log_format)
    return run_service("scheduler", lambda: serve(args))
