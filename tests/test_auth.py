"""API keys: with --api-key, every HTTP route but the allow-listed probes and every public gRPC
method demand the key; the routes are enumerated from the app, so a new route is covered."""

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.gateway.auth import OPEN_PATHS, ApiKeyInterceptor, ApiKeys, require_api_key
from pagedserve.gateway.grpc_api import GenerationService
from pagedserve.gateway.http_api import create_app
from pagedserve.gateway.scheduler_client import SchedulerClient
from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import GrpcServer, free_ports
from pagedserve.testing.processes import internal_auth
from pagedserve.v1 import generation_pb2, generation_pb2_grpc

KEY = "s3cret"


def test_every_http_route_needs_the_key_unless_allow_listed():
    # grpc.aio channels bind to the current event loop: give this test its own (a test that
    # ran asyncio.run before leaves none).
    asyncio.set_event_loop(asyncio.new_event_loop())
    # No scheduler: auth answers first.
    app = create_app(SchedulerClient("127.0.0.1:1", internal_auth(Role.GATEWAY)))
    require_api_key(app, ApiKeys.parse(KEY))
    client = TestClient(app, raise_server_exceptions=False)  # past auth, no scheduler: 5xx
    # The reference: the same app without keys. With the key, every route must answer as it.
    unguarded = TestClient(create_app(SchedulerClient("127.0.0.1:1",
                                                      internal_auth(Role.GATEWAY))),
                           raise_server_exceptions=False)
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods]
    assert ("POST", "/v1/chat/completions") in routes and len(routes) >= 7
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            reply = client.request(method, path, headers=headers)
            if path in OPEN_PATHS:
                assert reply.status_code != 401, path
            else:
                assert reply.status_code == 401, (method, path, headers)
                assert reply.json()["error"]["type"] == "authentication_error"
        reply = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status_code == unguarded.request(method, path).status_code != 401, \
            (method, path)


@pytest.mark.parametrize("metadata, allowed", [((), False), ((("authorization", "Bearer x"),),
                                                             False),
                                               ((("authorization", f"Bearer {KEY}"),), True)])
def test_grpc_methods_need_the_key_but_health_does_not(metadata, allowed):
    async def run():
        (port,) = free_ports(1)
        server = GrpcServer(f"127.0.0.1:{port}", [ApiKeyInterceptor(ApiKeys.parse(KEY))])
        generation_pb2_grpc.add_GenerationServicer_to_server(
            GenerationService(SchedulerClient("127.0.0.1:1", internal_auth(Role.GATEWAY))),
            server.server)
        await server.start(["pagedserve.v1.Generation"])
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                stub = generation_pb2_grpc.GenerationStub(channel)
                for call in (stub.ListModels(generation_pb2.ListModelsRequest(),
                                             metadata=metadata, timeout=5),
                             stub.Tokenize(generation_pb2.TokenizeRequest(text="x"),
                                           metadata=metadata, timeout=5),
                             stub.Detokenize(generation_pb2.DetokenizeRequest(token_ids=[1]),
                                             metadata=metadata, timeout=5)):
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await call
                    # Allowed calls get past auth and fail on the missing scheduler instead.
                    expected = grpc.StatusCode.UNAVAILABLE if allowed \
                        else grpc.StatusCode.UNAUTHENTICATED
                    assert error.value.code() == expected
                stream = stub.Generate(generation_pb2.GenerateRequest(text="x"),
                                       metadata=metadata, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stream:
                        pass
                assert error.value.code() == (grpc.StatusCode.UNAVAILABLE if allowed
                                              else grpc.StatusCode.UNAUTHENTICATED)
        finally:
            await server.stop()
    asyncio.run(run())


@pytest.mark.parametrize("command", ["gateway", "up"])
def test_help_never_shows_the_key_from_the_environment(command):
    result = subprocess.run([sys.executable, "-m", "pagedserve", command, "--help"],
                            env={**os.environ, "PAGEDSERVE_API_KEY": KEY}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--api-key" in result.stdout
    assert KEY not in result.stdout + result.stderr


def test_a_refused_key_is_not_logged(caplog, capsys):
    app = FastAPI()
    app.post("/v1/completions")(lambda: {})
    require_api_key(app, ApiKeys.parse(KEY))
    client = TestClient(app)
    with caplog.at_level("DEBUG"):
        for header, status in ((f"Bearer {KEY}x", 401), (f"Bearer {KEY}", 200), (KEY, 401)):
            assert client.post("/v1/completions", headers={"Authorization": header}
                               ).status_code == status
    logged = caplog.text + "".join(capsys.readouterr())
    assert KEY not in logged
