"""The gateway's errors and their one body: OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, for HTTP answers, the last event of a stream
that fails, and the API key check; gRPC answers carry the same status as a gRPC code
(grpc_api.py)."""

from __future__ import annotations

# Seconds a client refused for overload (429 / RESOURCE_EXHAUSTED) is told to wait.
RETRY_AFTER_S = 1


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


class GatewayError(Exception):
    """A request that cannot be served: its HTTP status, OpenAI error type and, for a bad
    field, the field's name (`param`)."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.error_type, self.param)
