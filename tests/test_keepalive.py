"""Keepalive between pagedserve's processes (pagedserve/runtime/serving.py): a stream that carries
no data for a while (a request waiting in the queue, an idle executor's Run stream, a long step)
must survive its channel's pings, while a peer pinging faster than servers allow is still cut.

The options are the ones every process uses, built with short intervals so that a test takes
seconds: what is checked is that gRPC core reads them (it ignores an option name it does not
know, which once left servers at its five-minute default and cut quiet streams after ~50 s)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pagedserve.runtime.serving import channel_options, server_options

SERVICE, METHOD = "pagedserve.test.Quiet", "Wait"


async def _quiet_call(server_opts, channel_opts, quiet_s: float) -> float:
    """Opens a stream whose server answers after `quiet_s` of silence; returns how long the
    answer took (raises the call's error if the connection was cut)."""
    async def wait(request_iterator, context):
        async for request in request_iterator:
            await asyncio.sleep(quiet_s)
            yield request

    server = grpc.aio.server(options=server_opts)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(wait)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_opts) as channel:
            async def requests():
                yield b"x"
                await asyncio.sleep(quiet_s * 10)  # the client's side stays open and quiet

            started = time.monotonic()
            call = channel.stream_stream(f"/{SERVICE}/{METHOD}")(requests())
            assert await call.read() == b"x"
            call.cancel()
            return time.monotonic() - started
    finally:
        await server.stop(0)


def test_a_quiet_stream_outlives_many_keepalive_pings():
    # Pings every 0.3 s against a server that accepts one every 0.2 s: ~20 pings in 6 s. With
    # gRPC's default policy the third early ping gets GOAWAY "too_many_pings" (~1 s).
    took = asyncio.run(_quiet_call(server_options(min_ping_interval_s=0.2),
                                   channel_options(keepalive_s=0.3, keepalive_timeout_s=5), 6.0))
    assert took >= 6.0


def test_a_peer_pinging_faster_than_servers_allow_is_cut():
    with pytest.raises(grpc.aio.AioRpcError) as error:
        asyncio.run(_quiet_call(server_options(min_ping_interval_s=2.0),
                                channel_options(keepalive_s=0.1, keepalive_timeout_s=5), 6.0))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in error.value.details().lower()
