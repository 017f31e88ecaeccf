"""How the scheduler talks to one executor: send step plans in order, receive their results in
order. Over gRPC this is the executor's long-lived `Run` stream; the offline API plugs in an
in-process handle with the same interface (pagedserve.entrypoints.offline)."""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc

from pagedserve.runtime.internal_auth import SESSION_HEADER, InternalAuth
from pagedserve.v1 import executor_pb2, executor_pb2_grpc


class ExecutorLost(Exception):
    """The executor's stream broke or the executor ended it (draining); either way its
    requests must be recomputed elsewhere."""


class ExecutorHandle(Protocol):
    async def send(self, plan: executor_pb2.StepPlan) -> None: ...

    async def receive(self) -> executor_pb2.StepResult:
        """The result of the oldest plan sent and not yet received; raises ExecutorLost."""
        ...

    async def close(self) -> None: ...


class GrpcExecutorHandle:
    """The executor's `Run` stream: plans go out through a queue the stream reads.
    `session_token`: the one the executor registered with ("" for an executor that did not
    register, as in the tests that drive one directly)."""

    def __init__(self, address: str, session_token: str = "", *, auth: InternalAuth):
        self.address = address
        self._channel = auth.channel(address)
        self._plans: asyncio.Queue[executor_pb2.StepPlan | None] = asyncio.Queue()
        self._call = executor_pb2_grpc.ExecutorStub(self._channel).Run(
            self._plan_stream(), metadata=((SESSION_HEADER, session_token),))

    async def _plan_stream(self):
        while (plan := await self._plans.get()) is not None:
            yield plan

    async def send(self, plan: executor_pb2.StepPlan) -> None:
        self._plans.put_nowait(plan)

    async def receive(self) -> executor_pb2.StepResult:
        try:
            result = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise ExecutorLost(f"{self.address}: {exc.code().name}: {exc.details()}") from None
        if result is grpc.aio.EOF:  # a draining executor (SIGTERM) hands its requests back
            raise ExecutorLost(f"{self.address}: the executor ended its Run stream (shutting "
                               "down)")
        return result

    async def close(self) -> None:
        self._plans.put_nowait(None)
        self._call.cancel()
        await self._channel.close()
