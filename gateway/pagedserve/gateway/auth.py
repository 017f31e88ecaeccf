"""Optional API keys (`--api-key`): deny by default. Every HTTP route and every method of the
public gRPC API needs `Authorization: Bearer <key>`, except the few on the allow-list that
probes and scrapers use."""

from __future__ import annotations

import hmac

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pagedserve.gateway.errors import error_body

# HTTP paths and gRPC services reachable without a key.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
OPEN_GRPC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


def key_matches(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), api_key)


def require_api_key(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path in OPEN_PATHS or key_matches(request.headers.get("authorization"),
                                                         api_key):
            return await call_next(request)
        return JSONResponse(status_code=401, content=error_body(
            401, "missing or invalid API key (send Authorization: Bearer <key>)",
            "authentication_error"))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self.api_key = api_key

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid API key (metadata authorization: "
                                "Bearer <key>)")
        self._deny = deny

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_GRPC_SERVICES) or key_matches(
                dict(details.invocation_metadata).get("authorization"), self.api_key):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.response_streaming:
            async def deny_stream(request, context):
                await self._deny(request, context)
                yield  # pragma: no cover (abort raises)
            return grpc.unary_stream_rpc_method_handler(
                deny_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._deny, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
