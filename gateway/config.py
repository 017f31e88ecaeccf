"""Flags of `pagedserve gateway` (each also settable as a PAGEDSERVE_* variable)."""

import argparse

from pagedserve.flags import add_common_flags

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 50051


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for clients (HTTP and gRPC)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="port of the OpenAI-compatible HTTP API")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="port of the public gRPC Generation API")
    add_common_flags(parser)
