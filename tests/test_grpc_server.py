"""The gRPC servers every pagedserve process runs (pagedserve/runtime/serving.py: GrpcServer)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.runtime.serving import GrpcServer, StartupError, free_ports


def test_a_port_another_server_listens_on_is_refused_by_name():
    """gRPC sets SO_REUSEPORT on Linux unless told not to: a second server then binds the same
    port without error and the kernel hands it some of the first one's connections (a test
    stack whose scheduler and executor got one port answered "Method not found" to scheduler
    calls). The second server must fail to start, saying which address is in use, and the
    first must keep answering every call."""
    async def run():
        (port,) = free_ports(1)
        address = f"127.0.0.1:{port}"
        first = GrpcServer(address)
        await first.start(["pagedserve.test.First"])
        try:
            with pytest.raises(StartupError, match=f"cannot listen on {address}.*in use"):
                await GrpcServer(address).start(["pagedserve.test.Second"])
            async with grpc.aio.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for _ in range(20):
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service="pagedserve.test.First"), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await first.stop()
    asyncio.run(run())
