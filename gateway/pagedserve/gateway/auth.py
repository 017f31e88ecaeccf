"""Optional API keys (`--api-key`): deny by default. Every HTTP route and every method of the
public gRPC API needs `Authorization: Bearer <key>`, except the few on the allow-list that
probes and scrapers use.

`--api-key` may list several keys, comma-separated: one per client or tenant, so that one can be
revoked alone, and so that `--cache-salt-per-api-key` has tenants to keep apart (a single shared
key would salt everyone alike)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import grpc
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pagedserve.gateway.errors import error_body

log = structlog.get_logger(__name__)

# HTTP paths and gRPC services reachable without a key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


@dataclass(frozen=True)
class ApiKeys:
    """The keys `--api-key` lists, as UTF-8 bytes."""

    keys: tuple[bytes, ...]

    @classmethod
    def parse(cls, raw: str) -> ApiKeys:
        """`raw`: one key or several, comma-separated; raises ValueError for an empty one."""
        keys = tuple(key.strip().encode() for key in raw.split(","))
        if not all(keys):
            raise ValueError("--api-key: an empty key (keys are comma-separated)")
        return cls(keys)

    def match(self, header: str | None) -> bytes | None:
        """The key an `Authorization: Bearer <key>` header carries, or None. Compared as bytes,
        so a token with non-ASCII characters is just wrong (str comparison would raise), in
        constant time and against every key, so the time tells nothing of which key matched."""
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = token.strip().encode(errors="replace")
        matched = None
        for key in self.keys:
            if hmac.compare_digest(presented, key):
                matched = key
        return matched


def key_salt(key: bytes, client_salt: str) -> str:
    """The prefix-cache salt of a request made with `key` and salted by its client with
    `client_salt` ("" for none): a digest, so the key cannot be read back from it (the salt
    travels to the scheduler), and no client salt under one key equals another key's."""
    return hashlib.sha256(b"pagedserve cache salt\0" + key + b"\0"
                          + client_salt.encode()).hexdigest()


def require_api_key(app: FastAPI, keys: ApiKeys) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path in OPEN_PATHS or keys.match(request.headers.get("authorization")):
            return await call_next(request)
        # What was refused and from where; never the token presented (a wrong key is often a
        # right key of another deployment, or a typo of this one's).
        log.warning("refused: missing or invalid API key", method=request.method,
                    path=request.url.path,
                    peer=f"{request.client.host}:{request.client.port}" if request.client
                    else None)
        return JSONResponse(status_code=401, content=error_body(
            401, "missing or invalid API key (send Authorization: Bearer <key>)",
            "authentication_error"))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys):
        self.keys = keys

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_GRPC_SERVICES) or self.keys.match(
                dict(details.invocation_metadata).get("authorization")):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None

        async def deny(request, context):
            # What was refused and from where, never the token presented (as over HTTP).
            log.warning("refused: missing or invalid API key", method=details.method,
                        peer=context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key (metadata authorization: "
                                "Bearer <key>)")
        # The refusal never parses the request (no deserializer: its bytes stay bytes), so an
        # unauthenticated 64 MiB message costs no protobuf decoding.
        if handler.response_streaming:
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover (abort raises)
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            deny, response_serializer=handler.response_serializer)
