"""Flags of `pagedserve scheduler` (each also settable as a PAGEDSERVE_* variable)."""

import argparse

from pagedserve.flags import add_common_flags

DEFAULT_PORT = 50052


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for gateways and executors")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gRPC port of the Scheduler service")
    add_common_flags(parser)
