"""Flags of `pagedserve gateway` (each also settable as a PAGEDSERVE_* variable)."""

import argparse

from pagedserve.gateway.tool_calls import PARSERS
from pagedserve.runtime.flags import add_common_flags, positive_float

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 50051
# Every request ends by then, so that nothing a client forgot (or a stuck stream) holds KV
# blocks for ever; long enough for a long generation on a CPU.
DEFAULT_REQUEST_TIMEOUT_S = 1800.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for clients (HTTP and gRPC)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="port of the OpenAI-compatible HTTP API")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="port of the public gRPC Generation API")
    parser.add_argument("--scheduler-address", default="127.0.0.1:50052",
                        help="host:port of the scheduler")
    add_api_key_argument(parser)
    add_request_timeout_argument(parser)
    add_client_policy_arguments(parser)
    parser.add_argument("--tokenizer", default=None,
                        help="local tokenizer directory; unset: the tokenizer files the "
                             "scheduler relays from an executor (no model volume needed)")
    add_common_flags(parser)


def add_client_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """What clients may ask for; shared with `pagedserve up`, which passes them on."""
    parser.add_argument("--allow-client-priority", action="store_true",
                        help="honour a request's `priority` (lower runs first and is preempted "
                             "last), within [-1000, 1000]; off: a non-zero priority is refused "
                             "with 400 / INVALID_ARGUMENT")
    parser.add_argument("--cache-salt-per-api-key", action="store_true",
                        help="salt every request's prefix cache by its API key (needs "
                             "--api-key, usually with one key per tenant): requests made with "
                             "different keys never share cached blocks, so cached_tokens tells "
                             "no tenant what another sent")


    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let chat requests use tool_choice "auto" (the default when they '
                             "send tools): the model decides whether to call, and its answer is "
                             "read with --tool-call-parser")
    parser.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                        help="the format the model writes tool calls in: hermes "
                             "(<tool_call>{...}</tool_call>: Hermes, Qwen), llama3_json (a JSON "
                             "object: Llama 3.1+), mistral ([TOOL_CALLS][...])")

    parser.add_argument("--pooler-config", default=None,
                        help='how /v1/embeddings pools a prompt\'s final hidden states, as '
                             'vLLM\'s JSON: {"pooling_type": "LAST" or "MEAN", "normalize": '
                             'true or false}; unset: LAST, normalized')


def add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    """Shared with `pagedserve up`, which passes it on to the gateway."""
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer <key>` on every API route and gRPC "
                             "method (health, readiness and metrics stay open); several keys, "
                             "comma-separated, are each accepted; unset: no auth")


def add_request_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """Shared with `pagedserve up`, which passes it on to the gateway."""
    parser.add_argument("--request-timeout", type=positive_float,
                        default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds a generation request may take, queueing included; past "
                             "it the request is aborted (its KV blocks freed) and answered 504 "
                             "/ DEADLINE_EXCEEDED. A client's X-Request-Timeout header or gRPC "
                             "call deadline may only shorten it")
