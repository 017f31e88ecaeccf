"""Internal authentication (issue 16): every internal RPC takes only the roles docs/design.md §6
gives it, proven by the internal secret and, with per-role certificates, by the peer's
certificate; a process without a credential does not start; `pagedserve up` makes a secret per
run, so its scheduler and executors refuse any caller that does not hold it."""

import argparse
import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import psutil
import pytest
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.executor.server import CALLERS as EXECUTOR_CALLERS
from pagedserve.runtime.internal_auth import (
    SECRET_ENV,
    InternalAuth,
    Role,
    _SyncMetadata,
    caller_policy,
    check_secret,
    new_secret,
    role_token,
)
from pagedserve.runtime.serving import (
    NO_TLS,
    GrpcServer,
    StartupError,
    TlsConfig,
    free_ports,
    sync_channel,
)
from pagedserve.scheduler.server import CALLERS as SCHEDULER_CALLERS
from pagedserve.testing.pki import make_ca, make_identity
from pagedserve.testing.processes import stack_ports
from pagedserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

GATEWAY, SCHEDULER, EXECUTOR = Role.GATEWAY, Role.SCHEDULER, Role.EXECUTOR
# The table, written out independently of the code's.
EXPECTED_CALLERS = {
    "/pagedserve.v1.Scheduler/Submit": {GATEWAY},
    "/pagedserve.v1.Scheduler/StopSequence": {GATEWAY},
    "/pagedserve.v1.Scheduler/GetStats": {GATEWAY},
    "/pagedserve.v1.Scheduler/GetModel": {GATEWAY},
    "/pagedserve.v1.Scheduler/RegisterExecutor": {EXECUTOR},
    "/pagedserve.v1.Scheduler/Heartbeat": {EXECUTOR},
    "/pagedserve.v1.Executor/Run": {SCHEDULER},
    "/pagedserve.v1.Executor/Describe": {SCHEDULER},
}
POLICY = {**SCHEDULER_CALLERS, **EXECUTOR_CALLERS}
SECRET = new_secret()


def test_the_policies_are_the_documented_table_and_cover_every_method():
    methods = {f"/{service.full_name}/{method.name}"
               for module in (scheduler_pb2, executor_pb2)
               for service in module.DESCRIPTOR.services_by_name.values()
               for method in service.methods}
    assert methods == set(EXPECTED_CALLERS)
    assert {method: set(roles) for method, roles in POLICY.items()} == EXPECTED_CALLERS


async def _serving(auth: InternalAuth) -> tuple[GrpcServer, str]:
    """Both internal services, unimplemented (UNIMPLEMENTED is what a call that got past
    authentication sees), behind `auth`'s interceptor and credentials."""
    (port,) = free_ports(1)
    server = GrpcServer(f"127.0.0.1:{port}", [auth.interceptor(POLICY)],
                        auth.server_credentials())
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler_pb2_grpc.SchedulerServicer(),
                                                       server.server)
    executor_pb2_grpc.add_ExecutorServicer_to_server(executor_pb2_grpc.ExecutorServicer(),
                                                     server.server)
    await server.start([])
    return server, f"127.0.0.1:{port}"


async def _call(channel: grpc.aio.Channel, method: str) -> grpc.StatusCode:
    """The status of an empty call of `method` (its request, or stream of none, is empty)."""
    try:
        if method.endswith("/Run"):
            async for _ in channel.stream_stream(method)(iter([]), timeout=5):
                pass
        elif method.endswith("/Submit"):
            async for _ in channel.unary_stream(method)(b"", timeout=5):
                pass
        else:
            await channel.unary_unary(method)(b"", timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _statuses(server_auth: InternalAuth, client_auths: dict[str, InternalAuth],
              methods=tuple(EXPECTED_CALLERS)) -> dict[tuple[str, str], grpc.StatusCode]:
    async def run():
        server, address = await _serving(server_auth)
        try:
            statuses = {}
            for name, auth in client_auths.items():
                async with auth.channel(address) as channel:
                    for method in methods:
                        statuses[name, method] = await _call(channel, method)
            return statuses
        finally:
            await server.stop()
    return asyncio.run(run())


def test_every_internal_method_takes_only_its_roles():
    clients = {role.value: InternalAuth(role, secret=SECRET) for role in Role}
    statuses = _statuses(InternalAuth(SCHEDULER, secret=SECRET), clients)
    for (client, method), status in statuses.items():
        allowed = Role(client) in EXPECTED_CALLERS[method]
        assert status == (grpc.StatusCode.UNIMPLEMENTED if allowed
                          else grpc.StatusCode.PERMISSION_DENIED), (client, method)


def test_a_call_without_the_secret_is_unauthenticated_but_health_is_open():
    no_role = InternalAuth(GATEWAY)  # no secret: sends its role without a token
    wrong = InternalAuth(GATEWAY, secret=new_secret())
    statuses = _statuses(InternalAuth(SCHEDULER, secret=SECRET),
                         {"no token": no_role, "wrong secret": wrong})
    assert set(statuses.values()) == {grpc.StatusCode.UNAUTHENTICATED}

    async def health():
        server, address = await _serving(InternalAuth(SCHEDULER, secret=SECRET))
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                return await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5)
        finally:
            await server.stop()
    assert asyncio.run(health()).status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def role_certificates(tmp_path_factory) -> dict[str, TlsConfig]:
    """Certificates of one CA: one per role (CN pagedserve-<role>) and one naming no role."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca(directory, "pagedserve-ca")
    tls = {}
    for name in [*(role.certificate_name for role in Role), "pagedserve"]:
        cert, key = make_identity(directory, name, "pagedserve-ca", ca_key)
        tls[name] = TlsConfig(str(cert), str(key), str(ca))
    return tls


REGISTER = "/pagedserve.v1.Scheduler/RegisterExecutor"
SUBMIT = "/pagedserve.v1.Scheduler/Submit"


def test_a_role_certificate_binds_its_holder_to_that_role(role_certificates):
    """With the secret too: a gateway's certificate cannot claim the executor role, while a
    certificate that names no role leaves the role to the secret."""
    certs = role_certificates
    clients = {"gateway as gateway": InternalAuth(GATEWAY, certs["pagedserve-gateway"], SECRET),
               "gateway as executor": InternalAuth(EXECUTOR, certs["pagedserve-gateway"],
                                                   SECRET),
               "no role as executor": InternalAuth(EXECUTOR, certs["pagedserve"], SECRET)}
    statuses = _statuses(InternalAuth(SCHEDULER, certs["pagedserve-scheduler"], SECRET),
                         clients, (SUBMIT, REGISTER))
    assert statuses["gateway as gateway", SUBMIT] == grpc.StatusCode.UNIMPLEMENTED
    assert statuses["gateway as executor", REGISTER] == grpc.StatusCode.PERMISSION_DENIED
    assert statuses["no role as executor", REGISTER] == grpc.StatusCode.UNIMPLEMENTED


def test_without_the_secret_only_a_role_certificate_proves_a_role(role_certificates):
    certs = role_certificates
    clients = {"executor": InternalAuth(EXECUTOR, certs["pagedserve-executor"]),
               "gateway as executor": InternalAuth(EXECUTOR, certs["pagedserve-gateway"]),
               "no role": InternalAuth(EXECUTOR, certs["pagedserve"])}
    statuses = _statuses(InternalAuth(SCHEDULER, certs["pagedserve-scheduler"]), clients,
                         (REGISTER,))
    assert statuses == {("executor", REGISTER): grpc.StatusCode.UNIMPLEMENTED,
                        ("gateway as executor", REGISTER): grpc.StatusCode.PERMISSION_DENIED,
                        ("no role", REGISTER): grpc.StatusCode.PERMISSION_DENIED}


def _args(secret: str | None, tls: TlsConfig = NO_TLS) -> argparse.Namespace:
    return argparse.Namespace(internal_secret=secret, tls_cert_file=tls.cert_file,
                              tls_key_file=tls.key_file, tls_ca_file=tls.ca_file)


def test_a_process_needs_a_credential_to_start(role_certificates):
    with pytest.raises(StartupError, match=SECRET_ENV):
        InternalAuth.from_args(_args(None), GATEWAY)
    with pytest.raises(StartupError, match="at least 32"):
        InternalAuth.from_args(_args("short"), GATEWAY)
    assert InternalAuth.from_args(_args(SECRET), GATEWAY).secret == SECRET
    mutual = InternalAuth.from_args(_args(None, role_certificates["pagedserve-gateway"]),
                                    GATEWAY)
    assert mutual.secret is None and mutual.tls.mutual


@pytest.mark.parametrize("command", ["scheduler", "executor", "gateway"])
def test_a_service_without_a_credential_refuses_to_start(command):
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    result = subprocess.run([sys.executable, "-m", "pagedserve", command], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert SECRET_ENV in result.stderr and "Traceback" not in result.stderr


REFUSED = "refused: missing or invalid API key"  # the gateway's log event


@pytest.mark.slow
def test_up_keeps_key_and_secret_out_of_logs_and_command_lines_and_refuses_strangers(
        tiny_llama_dir, tmp_path):
    """`up --api-key K` and no other security flag (the issue's case, on loopback): the API
    works with the key and refuses a wrong one, while the scheduler and the executor refuse
    callers without the run's secret, even one holding another secret (this test's own). The
    key, a wrong key sent to it and the run's internal secret appear in no process's log and
    on no child's command line (README: the key is never logged, and reaches the gateway
    through the environment, not a command line `ps` shows)."""
    key, wrong_key = f"right-{secrets.token_hex(16)}", f"wrong-{secrets.token_hex(16)}"
    http, grpc_port, scheduler, executor = stack_ports()
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    log_path = tmp_path / "log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "up", "--model", str(tiny_llama_dir),
         "--kv-cache-gib", "0.01", "--api-key", key, "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--scheduler-port", str(scheduler), "--executor-port",
         str(executor), "--log-format", "json"],
        env=env, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
    try:
        deadline = time.monotonic() + 180
        while "pagedserve is up" not in process.stdout.readline():
            assert process.poll() is None and time.monotonic() < deadline, "no stack"
        up_command_line = " ".join(psutil.Process(process.pid).cmdline())
        children = psutil.Process(process.pid).children(recursive=True)
        command_lines = {child.pid: " ".join(child.cmdline()) for child in children}
        (run_secret,) = {child.environ().get(SECRET_ENV) for child in children}
        assert run_secret and len(run_secret) >= 32 and run_secret != SECRET
        (gateway,) = [c for c in children if " gateway " in command_lines[c.pid]]
        assert gateway.environ().get("PAGEDSERVE_API_KEY") == key
        assert len(children) == 3, command_lines  # scheduler, executor, gateway

        _check_the_public_apis(http, grpc_port, key, wrong_key)
        strangers = {"no credential": InternalAuth(GATEWAY),
                     "another secret": InternalAuth(GATEWAY, secret=SECRET)}
        for address, method in ((f"127.0.0.1:{scheduler}", "/pagedserve.v1.Scheduler/GetStats"),
                                (f"127.0.0.1:{executor}", "/pagedserve.v1.Executor/Describe")):
            for name, auth in strangers.items():
                async def call(auth=auth, address=address, method=method):
                    async with auth.channel(address) as channel:
                        return await _call(channel, method)
                assert asyncio.run(call()) == grpc.StatusCode.UNAUTHENTICATED, (name, method)
    finally:
        process.terminate()
        process.wait(timeout=30)

    log = log_path.read_text()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == REFUSED and e["service"] == "gateway"]
    # Each refused request left a line (so the checks below read a log that has them): the
    # HTTP ones name their path, the gRPC ones their method.
    assert {e.get("path") for e in refused} >= {"/v1/models", "/v1/completions"}, refused
    assert {e.get("method") for e in refused} >= {"/pagedserve.v1.Generation/ListModels",
                                                  "/pagedserve.v1.Generation/Generate"}, refused
    internal = {e["service"] for e in events if e["event"] == "internal call refused"}
    assert internal == {"scheduler", "executor"}, events
    assert {e["service"] for e in events} >= {"up", "scheduler", "executor", "gateway"}
    # Command lines are read the way `ps` reads them: `up`'s own shows the key this test
    # gave it, as a user's would; its children's must not.
    assert key in up_command_line
    for name, value in (("API key", key), ("wrong key", wrong_key),
                        ("internal secret", run_secret), ("stranger's secret", SECRET)):
        for shown in (value, value[:16]):  # whole, or cut short
            assert shown not in log, f"the {name} is in the log"
            for pid, command_line in command_lines.items():
                assert shown not in command_line, f"the {name} is on {pid}'s command line"


def _check_the_public_apis(http: int, grpc_port: int, key: str, wrong_key: str) -> None:
    """With the key both APIs serve; without it, or with a wrong one, they refuse."""
    base = f"http://127.0.0.1:{http}"
    completion = json.dumps({"prompt": "the cat", "max_tokens": 2}).encode()
    for path, data in (("/v1/models", None), ("/v1/completions", completion)):
        served = urllib.request.Request(f"{base}{path}", data=data, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(served, timeout=30) as reply:
            assert reply.status == 200
        for headers in ({}, {"Authorization": f"Bearer {wrong_key}"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(
                    f"{base}{path}", data=data, headers={
                        **headers, "Content-Type": "application/json"}), timeout=10)
            assert refused.value.code == 401
    # The public gRPC API of the process users run needs the key too (issue 18: removing
    # the gateway's interceptor was caught by no test).
    generate = generation_pb2.GenerateRequest(
        text="the cat", sampling=common_pb2.SamplingParams(max_tokens=2))
    with sync_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        calls = (lambda metadata: stub.ListModels(generation_pb2.ListModelsRequest(),
                                                  timeout=10, metadata=metadata),
                 lambda metadata: list(stub.Generate(generate, timeout=10, metadata=metadata)))
        for metadata in ((), [("authorization", f"Bearer {wrong_key}")]):
            for call in calls:
                with pytest.raises(grpc.RpcError) as error:
                    call(metadata)
                assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        right = [("authorization", f"Bearer {key}")]
        assert stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10,
                               metadata=right).models
        replies = list(stub.Generate(generate, timeout=30, metadata=right))
        assert replies[-1].usage.completion_tokens == 2


# The credentials as docs/design.md §6 and README ("Limits and security") give them, written out
# independently of the code's constants.
DOCUMENTED_ENV = "PAGEDSERVE_INTERNAL_SECRET"
ROLE_KEY, TOKEN_KEY = "x-pagedserve-role", "x-pagedserve-token"


def _hmac(secret: str, role: str) -> str:
    return hmac.new(secret.encode(), role.encode(), hashlib.sha256).hexdigest()


def test_a_call_carries_its_role_and_the_hmac_of_the_role_never_the_secret():
    assert SECRET_ENV == DOCUMENTED_ENV
    tokens = set()
    for role in Role:
        token = _hmac(SECRET, role.value)
        tokens.add(token)
        assert role_token(SECRET, role) == token
        assert InternalAuth(role, secret=SECRET).metadata() == ((ROLE_KEY, role.value),
                                                                (TOKEN_KEY, token))
        assert InternalAuth(role).metadata() == ((ROLE_KEY, role.value),)
        assert role.certificate_name == f"pagedserve-{role.value}"
    assert len(tokens) == len(Role)  # one role's token proves no other role


def test_a_fresh_secret_is_like_openssl_rand_hex_32():
    """`up` makes the secret the start-up errors tell users to make: 32 random bytes in hex."""
    first, second = new_secret(), new_secret()
    assert len(first) == 64 and set(first) <= set("0123456789abcdef")
    assert first != second
    check_secret(first)


def test_a_secret_needs_32_characters_and_a_refusal_never_shows_it():
    check_secret("s" * 32)
    short = "x7-short-internal-secret-value"  # 30 characters
    for refuse in (lambda: check_secret(short),
                   lambda: InternalAuth.from_args(_args(short), GATEWAY)):
        with pytest.raises(StartupError) as error:
            refuse()
        assert str(error.value) == (
            f"--internal-secret ({DOCUMENTED_ENV}) has 30 characters; use at least 32 random "
            "ones (e.g. `openssl rand -hex 32`)")
        assert short not in str(error.value)
    with pytest.raises(StartupError, match="has 31 characters"):
        check_secret("s" * 31)


def test_from_args_keeps_the_role_and_reads_an_empty_secret_as_none():
    for role in Role:
        auth = InternalAuth.from_args(_args(SECRET), role)
        assert (auth.role, auth.secret, auth.tls) == (role, SECRET, NO_TLS)
    with pytest.raises(StartupError) as error:
        InternalAuth.from_args(_args(""), EXECUTOR)
    assert str(error.value) == (
        f"internal calls need a credential: set {DOCUMENTED_ENV} (or --internal-secret) to the "
        "same random value in every service (e.g. `openssl rand -hex 32`), or give "
        "--tls-cert-file, --tls-key-file and --tls-ca-file with a certificate per role (CN "
        "pagedserve-<role>); `pagedserve up` makes a secret itself")


def test_caller_policy_qualifies_each_method_by_its_service():
    assert caller_policy("a.v1.B", {"M": [GATEWAY, EXECUTOR], "N": [SCHEDULER], "O": []}) == {
        "/a.v1.B/M": frozenset({GATEWAY, EXECUTOR}), "/a.v1.B/N": frozenset({SCHEDULER}),
        "/a.v1.B/O": frozenset()}


ECHO = "pagedserve.test.Echo"
SHAPES = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")
# The gateway may call every shape; "Unlisted" is served but in no policy.
ECHO_POLICY = caller_policy(ECHO, {shape: [GATEWAY] for shape in SHAPES})


class _Echo:
    """A service of every call shape answering what reached it: the requests as its
    deserializer parsed them, and the caller's x- metadata. It records every request parsed."""

    def __init__(self):
        self.parsed: list[bytes] = []

    def _parse(self, data: bytes) -> str:
        self.parsed.append(data)
        return f"parsed {data.decode()}"

    @staticmethod
    def _reply(requests: list[str], context) -> dict:
        return {"requests": requests, "metadata": sorted(
            [key, value] for key, value in context.invocation_metadata()
            if key.startswith("x-"))}

    def handler(self) -> grpc.GenericRpcHandler:
        async def unary_unary(request, context):
            return self._reply([request], context)

        async def unary_stream(request, context):
            yield self._reply([request], context)

        async def stream_unary(requests, context):
            return self._reply([r async for r in requests], context)

        async def stream_stream(requests, context):
            yield self._reply([r async for r in requests], context)

        def encode(reply: dict) -> bytes:  # replies are dicts: a handler without it fails
            return json.dumps(reply).encode()
        return grpc.method_handlers_generic_handler(ECHO, {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary, self._parse, encode),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, self._parse,
                                                                encode),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary, self._parse,
                                                                encode),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, self._parse,
                                                                  encode),
            "Unlisted": grpc.unary_unary_rpc_method_handler(unary_unary, self._parse, encode)})


@contextlib.asynccontextmanager
async def _echo_server(auth: InternalAuth):
    echo = _Echo()
    (port,) = free_ports(1)
    server = GrpcServer(f"127.0.0.1:{port}", [auth.interceptor(ECHO_POLICY)],
                        auth.server_credentials())
    server.server.add_generic_rpc_handlers((echo.handler(),))
    await server.start([])
    try:
        yield echo, f"127.0.0.1:{port}"
    finally:
        await server.stop()


async def _echo(channel: grpc.aio.Channel, shape: str, metadata=None,
                stream=(b"one", b"two")) -> dict:
    """One call of `shape` sending b"one" (streams: `stream`); its single reply."""
    method, shapes = f"/{ECHO}/{shape}", {"UnaryUnary": channel.unary_unary,
                                          "UnaryStream": channel.unary_stream,
                                          "StreamUnary": channel.stream_unary,
                                          "StreamStream": channel.stream_stream}
    call = shapes.get(shape, channel.unary_unary)(method, response_deserializer=json.loads)
    request = iter(stream) if shape.startswith("Stream") else b"one"
    if shape.endswith("Stream"):
        (reply,) = [r async for r in call(request, metadata=metadata, timeout=5)]
        return reply
    return await call(request, metadata=metadata, timeout=5)


def _expected(shape: str, role: Role, secret: str | None = SECRET) -> dict:
    requests = ["parsed one", "parsed two"] if shape.startswith("Stream") else ["parsed one"]
    metadata = [["x-extra", "kept"], [ROLE_KEY, role.value]]
    if secret is not None:
        metadata.append([TOKEN_KEY, _hmac(secret, role.value)])
    return {"requests": requests, "metadata": sorted(metadata)}


def test_an_internal_channel_adds_the_credentials_to_every_call_shape_and_keeps_the_rest():
    """Each shape: the request and the caller's own metadata arrive as sent, the role and token
    beside them, and the reply comes back through the handler's serializer."""
    async def run():
        async with (_echo_server(InternalAuth(SCHEDULER, secret=SECRET)) as (echo, address),
                    InternalAuth(GATEWAY, secret=SECRET).channel(address) as channel):
            return {shape: await _echo(channel, shape, (("x-extra", "kept"),))
                    for shape in SHAPES}, echo.parsed
    replies, parsed = asyncio.run(run())
    assert replies == {shape: _expected(shape, GATEWAY) for shape in SHAPES}
    assert parsed == [b"one", b"one", b"one", b"two", b"one", b"two"]


def _sync_echo(channel: grpc.Channel, shape: str) -> dict:
    method, metadata = f"/{ECHO}/{shape}", (("x-extra", "kept"),)
    call = {"UnaryUnary": channel.unary_unary, "UnaryStream": channel.unary_stream,
            "StreamUnary": channel.stream_unary, "StreamStream": channel.stream_stream}[shape](
        method, response_deserializer=json.loads)
    request = iter([b"one", b"two"]) if shape.startswith("Stream") else b"one"
    if shape.endswith("Stream"):
        (reply,) = call(request, metadata=metadata, timeout=5)
        return reply
    return call(request, metadata=metadata, timeout=5)


def test_a_blocking_internal_channel_adds_the_credentials_to_every_call_shape(
        role_certificates):
    """In plaintext with the secret, and over mutual TLS with a role certificate alone."""
    certs = role_certificates
    cases = {"secret": (InternalAuth(SCHEDULER, secret=SECRET),
                        InternalAuth(GATEWAY, secret=SECRET)),
             "tls": (InternalAuth(SCHEDULER, certs["pagedserve-scheduler"]),
                     InternalAuth(GATEWAY, certs["pagedserve-gateway"]))}

    def calls(auth: InternalAuth, address: str) -> dict:
        with auth.sync_channel(address) as channel:
            return {shape: _sync_echo(channel, shape) for shape in SHAPES}

    async def run(server_auth, client_auth):
        async with _echo_server(server_auth) as (_, address):
            return await asyncio.to_thread(calls, client_auth, address)
    for name, (server_auth, client_auth) in cases.items():
        replies = asyncio.run(run(server_auth, client_auth))
        assert replies == {shape: _expected(shape, GATEWAY, client_auth.secret)
                           for shape in SHAPES}, name


def test_a_blocking_channel_passes_every_call_detail_on_and_adds_the_credentials():
    Details = collections.namedtuple("Details", ("method", "timeout", "metadata", "credentials",
                                                 "wait_for_ready", "compression"))
    credentials = grpc.access_token_call_credentials("call-token")
    added = InternalAuth(GATEWAY, secret=SECRET).metadata()
    interceptor = _SyncMetadata(added)
    for own_metadata, expected in (((("x-extra", "kept"),), (("x-extra", "kept"), *added)),
                                   (None, added)):
        made = Details("/a.v1.B/C", 7.5, own_metadata, credentials, True,
                       grpc.Compression.Gzip)
        for shape in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            passed = []

            def continuation(details, request, passed=passed):
                passed.append((details, request))
                return "the call"
            assert getattr(interceptor, f"intercept_{shape}")(continuation, made,
                                                               "request") == "the call"
            ((details, request),) = passed
            assert request == "request" and isinstance(details, grpc.ClientCallDetails)
            assert (details.method, details.timeout, tuple(details.metadata),
                    details.credentials, details.wait_for_ready, details.compression) == (
                "/a.v1.B/C", 7.5, expected, credentials, True, grpc.Compression.Gzip), shape


def _refusals(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "internal call refused"]


UNARY = f"/{ECHO}/UnaryUnary"
STREAMS = f"/{ECHO}/StreamStream"
UNLISTED = f"/{ECHO}/Unlisted"
NO_ROLE = ": internal call without a pagedserve role (metadata x-pagedserve-role)"


def _wrong_credential(role: str) -> str:
    return (f": missing or wrong internal credential for role {role} (is {DOCUMENTED_ENV} the "
            "same in every service?)")


def test_each_refusal_says_why_with_its_status_parses_nothing_and_is_logged_without_secrets():
    other_secret = new_secret()
    gateway_token = _hmac(SECRET, "gateway")
    cases = [  # (method, metadata sent, status, details)
        (UNARY, (), grpc.StatusCode.UNAUTHENTICATED, UNARY + NO_ROLE),
        (STREAMS, (), grpc.StatusCode.UNAUTHENTICATED, STREAMS + NO_ROLE),
        (UNARY, ((ROLE_KEY, "admin"), (TOKEN_KEY, _hmac(SECRET, "admin"))),
         grpc.StatusCode.UNAUTHENTICATED, UNARY + NO_ROLE),
        (UNARY, ((ROLE_KEY, "gateway"),), grpc.StatusCode.UNAUTHENTICATED,
         UNARY + _wrong_credential("gateway")),
        (UNARY, ((ROLE_KEY, "gateway"), (TOKEN_KEY, _hmac(other_secret, "gateway"))),
         grpc.StatusCode.UNAUTHENTICATED, UNARY + _wrong_credential("gateway")),
        # The gateway's own token cannot claim another role.
        (UNARY, ((ROLE_KEY, "executor"), (TOKEN_KEY, gateway_token)),
         grpc.StatusCode.UNAUTHENTICATED, UNARY + _wrong_credential("executor")),
        (UNARY, ((ROLE_KEY, "executor"), (TOKEN_KEY, _hmac(SECRET, "executor"))),
         grpc.StatusCode.PERMISSION_DENIED, f"{UNARY}: the executor role may not call it"),
        # A served method that no policy lists is refused to every role.
        (UNLISTED, ((ROLE_KEY, "gateway"), (TOKEN_KEY, gateway_token)),
         grpc.StatusCode.PERMISSION_DENIED, f"{UNLISTED}: the gateway role may not call it"),
    ]

    async def run():
        async with (_echo_server(InternalAuth(SCHEDULER, secret=SECRET)) as (echo, address),
                    grpc.aio.insecure_channel(address) as channel):
            results = []
            for method, metadata, _, _ in cases:
                # A refused stream sends nothing: grpc.aio reports a write that loses the race
                # with the server's status as INTERNAL instead (grpc/grpc#36066).
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await _echo(channel, method.rsplit("/", 1)[1], metadata, stream=())
                results.append((error.value.code(), error.value.details()))
            return results, echo.parsed
    with structlog.testing.capture_logs() as logs:
        results, parsed = asyncio.run(run())
    assert results == [(code, details) for _, _, code, details in cases]
    assert parsed == []  # refused before the request was parsed
    refusals = _refusals(logs)
    assert [e["reason"] for e in refusals] == [details for _, _, _, details in cases], logs
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in refusals), refusals
    for secret in (SECRET, other_secret, gateway_token, _hmac(SECRET, "executor")):
        assert secret not in repr(logs) and secret[:16] not in repr(results)


def test_a_certificate_refusal_names_the_certificate_and_the_role_and_is_logged(
        role_certificates):
    certs = role_certificates
    cases = {  # client: (its certificate, the role it claims, the refusal's details)
        "executor as gateway": (
            "pagedserve-executor", GATEWAY,
            "the client certificate belongs to role executor, but the call claims role "
            "gateway"),
        "no role": (
            "pagedserve", GATEWAY,
            "no internal secret is set, so the client certificate must name the role: its "
            "Common Name must be pagedserve-gateway"),
        "gateway": ("pagedserve-gateway", GATEWAY, None)}

    async def run():
        results = {}
        async with _echo_server(InternalAuth(SCHEDULER, certs["pagedserve-scheduler"])) as (
                _, address):
            for name, (cert, role, _) in cases.items():
                async with InternalAuth(role, certs[cert]).channel(address) as channel:
                    try:
                        results[name] = await _echo(channel, "UnaryUnary",
                                                    (("x-extra", "kept"),))
                    except grpc.aio.AioRpcError as error:
                        results[name] = (error.code(), error.details())
        return results
    with structlog.testing.capture_logs() as logs:
        results = asyncio.run(run())
    assert results == {
        name: (grpc.StatusCode.PERMISSION_DENIED, details) if details else
        _expected("UnaryUnary", GATEWAY, None) for name, (_, _, details) in cases.items()}
    refusals = _refusals(logs)
    assert [e["reason"] for e in refusals] == [d for _, _, d in cases.values() if d], logs
    assert all(e["peer"].startswith("ipv4:127.0.0.1:") for e in refusals), refusals
