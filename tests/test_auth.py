"""API keys: with --api-key, every HTTP route but the allow-listed probes and every public gRPC
method demand the key; the routes are enumerated from the app, so a new route is covered."""

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import structlog.testing
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


@contextlib.asynccontextmanager
async def guarded_generation_api() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the public gRPC API behind the key check, with no scheduler behind it."""
    (port,) = free_ports(1)
    server = GrpcServer(f"127.0.0.1:{port}", [ApiKeyInterceptor(ApiKeys.parse(KEY))])
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationService(SchedulerClient("127.0.0.1:1", internal_auth(Role.GATEWAY))),
        server.server)
    await server.start(["pagedserve.v1.Generation"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop()


@pytest.mark.parametrize("metadata, allowed", [((), False), ((("authorization", "Bearer x"),),
                                                             False),
                                               ((("authorization", f"Bearer {KEY}"),), True)])
def test_grpc_methods_need_the_key_but_health_does_not(metadata, allowed):
    async def run():
        async with guarded_generation_api() as channel:
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


# -- the key check itself ---------------------------------------------------------------------

def test_a_key_matches_only_as_the_whole_bearer_token():
    keys = ApiKeys.parse("k1, my key ,k3")
    assert keys.keys == (b"k1", b"my key", b"k3")
    assert keys.match("Bearer k1") == b"k1" and keys.match("bearer k3") == b"k3"
    assert keys.match("Bearer my key") == b"my key"  # the token is all after the scheme
    for wrong in (None, "", "k1", "Bearer", "Bearer k", "Bearer k1x", "Basic k1", "Bearer \udc80",
                  "Bearer é"):
        assert keys.match(wrong) is None, wrong  # never raises, never a falsy non-None


@pytest.mark.parametrize("raw", ["", "k1,,k2", "k1, ", ","])
def test_an_empty_key_is_refused_at_start(raw):
    with pytest.raises(ValueError, match=r"^--api-key: an empty key \(keys are "
                       r"comma-separated\)$"):
        ApiKeys.parse(raw)


def test_cache_salts_per_key_do_not_change_between_versions():
    """--cache-salt-per-api-key: gateways of different versions behind one scheduler (a rolling
    upgrade) must salt a key alike, or its cached prefixes stop hitting."""
    from pagedserve.gateway.auth import key_salt

    assert key_salt(b"k1", "") == \
        "2158606c5d7a050a82516bb2124b2e1f59f2103e8dba8ed6dda0add76b301df3"
    assert key_salt(b"k1", "s") == \
        "e43a9ac675b2d13b57bd1ca8ffc20d81883decf47e805a0977996492c73dfc0d"


def test_a_grpc_refusal_says_how_to_send_the_key_and_is_logged_without_it():
    async def run():
        async with guarded_generation_api() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await generation_pb2_grpc.GenerationStub(channel).ListModels(
                    generation_pb2.ListModelsRequest(), timeout=5,
                    metadata=[("authorization", "Bearer wrong-key")])
            assert error.value.details() == \
                "missing or invalid API key (metadata authorization: Bearer <key>)"
    with structlog.testing.capture_logs() as logs:
        asyncio.run(run())
    refusals = [e for e in logs if e["event"] == "refused: missing or invalid API key"]
    assert len(refusals) == 1, logs
    assert refusals[0]["method"] == "/pagedserve.v1.Generation/ListModels"
    assert refusals[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert "wrong-key" not in repr(logs)
