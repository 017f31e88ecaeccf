"""How the gateway maps the scheduler's gRPC status codes to HTTP errors (OpenAI's shape)."""

import grpc
import pytest

from pagedserve.gateway.scheduler_client import from_rpc_error


@pytest.mark.parametrize("code, details, status, words", [
    (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be positive", 400, "max_tokens"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full", 429, "queue is full"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", 503, "unreachable"),
    # A scheduler shutting down cancels its calls: retryable, and said so.
    (grpc.StatusCode.CANCELLED, "CANCELLED", 503, "ended the request early"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed", 504, "deadline passed"),
    (grpc.StatusCode.INTERNAL, "boom", 500, "boom"),
])
def test_status_codes_map_to_http(code, details, status, words):
    error = from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                                details=details))
    assert error.status == status
    assert words in error.message
