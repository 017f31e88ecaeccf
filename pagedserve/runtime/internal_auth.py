"""Who may call which internal RPC (docs/design.md §6, docs/reliability.md "Threat model").

Every process of the internal plane has a role: the gateway, the scheduler or an executor. Each
internal service says which roles may call each of its methods (a `CallerPolicy`); anything else,
unknown methods included, is refused. grpc.health.v1 stays open: probes carry no credentials and
health reveals nothing.

A caller proves its role in one or both of two ways; a server checks every way it is configured
for:
- **The internal secret** (`--internal-secret`, usually `PAGEDSERVE_INTERNAL_SECRET`): one random
  value shared by the processes of a deployment. A call carries its role and HMAC-SHA256(secret,
  role), never the secret itself. `pagedserve up` makes a fresh one per run; the Helm chart keeps
  one in a Secret. Whoever holds it can claim any role: it keeps out everyone else.
- **Mutual TLS with per-role certificates**: a peer certificate whose Common Name is
  `pagedserve-<role>` binds the peer to that role, so a gateway's certificate cannot register an
  executor even with the secret. A certificate whose name is no role (one certificate for every
  process, as `pagedserve up --tls-*` uses) authenticates the connection but not a role; the
  secret then does that.

A process starts only with the secret, or with complete mutual TLS (its peers then need
role-named certificates). Nothing is on by accident: no credential at all is a start-up error.
"""

from __future__ import annotations

import argparse
import collections
import enum
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import structlog

from pagedserve.runtime.flags import env_var
from pagedserve.runtime.serving import (
    NO_TLS,
    StartupError,
    TlsConfig,
    aio_channel,
    sync_channel,
)

SECRET_ENV = env_var("--internal-secret")
ROLE_HEADER = "x-pagedserve-role"
TOKEN_HEADER = "x-pagedserve-token"
# Metadata of the scheduler's Run call: the session token of the executor's registration
# (scheduler.proto, RegisterExecutorRequest.session_token). A registered executor takes Run
# only with it, so only the scheduler it registered with drives it.
SESSION_HEADER = "x-pagedserve-session"
# Shorter secrets are refused: the HMAC is only as strong as the secret it keys.
MIN_SECRET_CHARS = 32
OPEN_SERVICES = ("/grpc.health.v1.Health/",)

log = structlog.get_logger(__name__)


class Role(enum.StrEnum):
    GATEWAY = "gateway"
    SCHEDULER = "scheduler"
    EXECUTOR = "executor"

    @property
    def certificate_name(self) -> str:
        """The Common Name of a certificate that belongs to this role."""
        return f"pagedserve-{self.value}"


# Full gRPC method name ("/package.Service/Method") -> the roles that may call it.
CallerPolicy = Mapping[str, frozenset[Role]]


def new_secret() -> str:
    return secrets.token_hex(32)


def check_secret(secret: str) -> None:
    if len(secret) < MIN_SECRET_CHARS:
        raise StartupError(f"--internal-secret ({SECRET_ENV}) has {len(secret)} characters; "
                           f"use at least {MIN_SECRET_CHARS} random ones (e.g. "
                           "`openssl rand -hex 32`)")


def role_token(secret: str, role: Role) -> str:
    return hmac.new(secret.encode(), role.value.encode(), hashlib.sha256).hexdigest()


def _peer_common_name(context: grpc.aio.ServicerContext) -> str | None:
    """The Common Name of the peer's client certificate; None without one."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode(errors="replace") if names else None


@dataclass(frozen=True)
class InternalAuth:
    """This process's role and credentials, for its internal channels and servers."""

    role: Role
    tls: TlsConfig = NO_TLS
    secret: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, role: Role) -> InternalAuth:
        """From the common flags; StartupError when there is no usable credential."""
        auth = cls(role, TlsConfig.from_args(args), args.internal_secret or None)
        if auth.secret is not None:
            check_secret(auth.secret)
        if auth.secret is None and not auth.tls.mutual:
            raise StartupError(
                f"internal calls need a credential: set {SECRET_ENV} (or "
                "--internal-secret) to the same random value in every service (e.g. "
                "`openssl rand -hex 32`), or give --tls-cert-file, --tls-key-file and "
                "--tls-ca-file with a certificate per role (CN pagedserve-<role>); "
                "`pagedserve up` makes a secret itself")
        return auth

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every internal call of this process carries."""
        if self.secret is None:
            return ((ROLE_HEADER, self.role.value),)
        return (ROLE_HEADER, self.role.value), (TOKEN_HEADER, role_token(self.secret, self.role))

    def channel(self, address: str) -> grpc.aio.Channel:
        """An internal channel: this process's TLS, and its credentials on every call."""
        return aio_channel(address, self.tls, interceptors=_metadata_interceptors(
            self.metadata()))

    def sync_channel(self, address: str) -> grpc.Channel:
        """The blocking twin of `channel` (tools, tests)."""
        return grpc.intercept_channel(sync_channel(address, self.tls),
                                      _SyncMetadata(self.metadata()))

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.server_credentials()

    def interceptor(self, policy: CallerPolicy) -> grpc.aio.ServerInterceptor:
        return _CallerCheck(self.secret, policy)


def _metadata_interceptors(metadata: tuple[tuple[str, str], ...]
                           ) -> list[grpc.aio.ClientInterceptor]:
    """One client interceptor per call shape (grpc.aio files each interceptor under one shape
    only), each adding `metadata` to the call."""
    async def intercept(self, continuation, details, request):
        extra = tuple(details.metadata or ()) + metadata
        return await continuation(details._replace(metadata=grpc.aio.Metadata(*extra)), request)

    shapes = {grpc.aio.UnaryUnaryClientInterceptor: "intercept_unary_unary",
              grpc.aio.UnaryStreamClientInterceptor: "intercept_unary_stream",
              grpc.aio.StreamUnaryClientInterceptor: "intercept_stream_unary",
              grpc.aio.StreamStreamClientInterceptor: "intercept_stream_stream"}
    return [type(f"_Add{base.__name__}", (base,), {name: intercept})()
            for base, name in shapes.items()]


class _SyncCallDetails(
        collections.namedtuple("_SyncCallDetails", ("method", "timeout", "metadata",
                                                    "credentials", "wait_for_ready",
                                                    "compression")),
        grpc.ClientCallDetails):
    pass


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `metadata` to every call of a blocking channel (which, unlike grpc.aio, takes one
    interceptor for every call shape)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _add(self, continuation, details, request):
        return continuation(_SyncCallDetails(
            details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
            details.credentials, details.wait_for_ready, details.compression), request)

    intercept_unary_unary = intercept_unary_stream = _add
    intercept_stream_unary = intercept_stream_stream = _add


class _CallerCheck(grpc.aio.ServerInterceptor):
    """Refuses a call unless its role may call the method and every configured credential
    proves that role. The metadata is checked before the request message is parsed; the peer
    certificate, which only the call's context shows, when the call starts."""

    def __init__(self, secret: str | None, policy: CallerPolicy):
        self._secret = secret
        self._policy = policy

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        metadata = dict(details.invocation_metadata)
        try:
            role = self._claimed_role(details.method, metadata)
        except _Refused as refusal:
            return _refusing(handler, refusal.code, str(refusal))
        return _checking_certificate(handler, role, requires_certificate=self._secret is None)

    def _claimed_role(self, method: str, metadata: Mapping[str, str]) -> Role:
        claimed = metadata.get(ROLE_HEADER)
        if claimed not in Role.__members__.values():
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                           f"{method}: internal call without a pagedserve role "
                           f"(metadata {ROLE_HEADER})")
        role = Role(claimed)
        if self._secret is not None and not hmac.compare_digest(
                metadata.get(TOKEN_HEADER, "").encode(), role_token(self._secret, role).encode()):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                           f"{method}: missing or wrong internal credential for role {role} "
                           f"(is {SECRET_ENV} the same in every service?)")
        if role not in self._policy.get(method, frozenset()):
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method}: the {role} role may not call it")
        return role


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


# (request streaming, response streaming) -> the handler's behaviour attribute and factory.
_SHAPES = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
           (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
           (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
           (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}


def _wrap(handler: grpc.RpcMethodHandler,
          guard: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
          parse: bool = True) -> grpc.RpcMethodHandler:
    """`handler` with `guard(context)` awaited before its behaviour runs (the guard aborts to
    refuse). parse=False leaves the request unparsed: its behaviour would get the bytes as they
    came, but it is refused anyway."""
    name, factory = _SHAPES[handler.request_streaming, handler.response_streaming]
    behaviour = getattr(handler, name)
    if handler.response_streaming:
        async def guarded(request, context):
            await guard(context)
            async for reply in behaviour(request, context):
                yield reply
    else:
        async def guarded(request, context):
            await guard(context)
            return await behaviour(request, context)
    deserializer = handler.request_deserializer if parse else None
    return factory(guarded, deserializer, handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
              message: str) -> grpc.RpcMethodHandler:
    async def refuse(context: grpc.aio.ServicerContext) -> None:
        log.warning("internal call refused", peer=context.peer(), reason=message)
        await context.abort(code, message)
    return _wrap(handler, refuse, parse=False)


def _checking_certificate(handler: grpc.RpcMethodHandler, role: Role,
                          requires_certificate: bool) -> grpc.RpcMethodHandler:
    """Checks that a client certificate naming a role names `role`; without the secret the
    certificate must name it (nothing else proves the role then)."""
    async def check(context: grpc.aio.ServicerContext) -> None:
        common_name = _peer_common_name(context)
        named = next((r for r in Role if r.certificate_name == common_name), None)
        if named is role:
            return
        if named is not None:
            message = (f"the client certificate belongs to role {named}, "
                       f"but the call claims role {role}")
        elif requires_certificate:
            message = (f"no internal secret is set, so the client certificate must name the "
                       f"role: its Common Name must be {role.certificate_name}")
        else:
            return
        log.warning("internal call refused", peer=context.peer(), reason=message)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
    return _wrap(handler, check)


def caller_policy(service: str, callers: Mapping[str, Sequence[Role]]) -> CallerPolicy:
    """A policy from method short names of one service (package-qualified, e.g.
    "pagedserve.v1.Scheduler")."""
    return {f"/{service}/{method}": frozenset(roles) for method, roles in callers.items()}
