"""Keeping an executor registered with its scheduler (docs/design.md §2, §6).

Registers on start, retrying with backoff until the scheduler answers; then heartbeats at the
interval the scheduler asked for. A heartbeat answered `registered: false` (the scheduler
restarted or dropped us) or failing means: register again. A registration refused with
FAILED_PRECONDITION (the scheduler dropped this executor as wedged) raises ExecutorRefused: only
a new process may come back.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog

from pagedserve.runtime.internal_auth import InternalAuth
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

RPC_TIMEOUT_S = 5.0
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0
DEFAULT_HEARTBEAT_S = 2.0

log = structlog.get_logger(__name__)


class ExecutorRefused(Exception):
    """The scheduler will not take this executor back (it was dropped as wedged)."""


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def keep_registered(scheduler_address: str,
                          registration: scheduler_pb2.RegisterExecutorRequest,
                          stop: asyncio.Event, auth: InternalAuth) -> None:
    retry_s = FIRST_RETRY_S
    while not stop.is_set():
        # A fresh channel per attempt: a long-lived one would follow gRPC's own reconnect
        # backoff (growing to 120 s, failing every call meanwhile), which would keep this
        # executor away long after a restarted scheduler is back.
        async with auth.channel(scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            try:
                reply = await stub.RegisterExecutor(registration, timeout=RPC_TIMEOUT_S)
                log.info("registered with the scheduler", scheduler=scheduler_address,
                         executor_id=registration.executor_id)
                retry_s = FIRST_RETRY_S
                await _heartbeat_until_forgotten(stub, registration, reply.heartbeat_interval_s,
                                                 stop)
                continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise ExecutorRefused(exc.details()) from None
                log.warning("scheduler not reachable, retrying", scheduler=scheduler_address,
                            code=exc.code().name, details=exc.details(), retry_in_s=retry_s)
        await _sleep_unless(stop, retry_s)
        retry_s = min(retry_s * 2, MAX_RETRY_S)


async def _heartbeat_until_forgotten(stub: scheduler_pb2_grpc.SchedulerStub,
                                     registration: scheduler_pb2.RegisterExecutorRequest,
                                     interval_s: float, stop: asyncio.Event) -> None:
    request = scheduler_pb2.HeartbeatRequest(executor_id=registration.executor_id,
                                             session_token=registration.session_token)
    while not stop.is_set():
        await _sleep_unless(stop, interval_s or DEFAULT_HEARTBEAT_S)
        if stop.is_set():
            return
        reply = await stub.Heartbeat(request, timeout=RPC_TIMEOUT_S)
        if not reply.registered:
            log.warning("the scheduler does not know this executor; registering again")
            return
