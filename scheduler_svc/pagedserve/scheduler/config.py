"""Flags of `pagedserve scheduler` (each also settable as a PAGEDSERVE_* variable)."""

import argparse

from pagedserve.runtime.flags import add_common_flags, positive_float

DEFAULT_PORT = 50052
# Sequences waiting for a step before new requests are refused (0: no limit).
DEFAULT_MAX_QUEUE_LEN = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for gateways and executors")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gRPC port of the Scheduler service")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn automatic prefix caching off")
    parser.add_argument("--no-overlap", action="store_true",
                        help="wait for each step's result before planning the next "
                             "(default: plan it while the step runs where that pays, as "
                             "measured)")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0,
                        help="seconds between executor heartbeats; a lease lapses after three "
                             "missed ones")
    parser.add_argument("--no-executor-timeout", type=float, default=30.0,
                        help="seconds a request waits for an executor of its model before it "
                             "fails with UNAVAILABLE")
    add_step_timeout_argument(parser)
    add_overload_arguments(parser)
    add_common_flags(parser)


def add_overload_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared with `pagedserve up`, which passes them on to the scheduler."""
    parser.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN,
                        help="most sequences waiting for a step (new and preempted); a request "
                             "arriving when the queue is full gets RESOURCE_EXHAUSTED (HTTP 429 "
                             "with Retry-After) at once; 0: no limit")


def add_step_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """Shared with `pagedserve up`, which passes it on to the scheduler."""
    parser.add_argument("--step-timeout", type=positive_float, default=120.0,
                        help="seconds an executor gets for one step, twice that for a step of "
                             "the whole token budget; past it the executor counts as wedged: "
                             "its requests are recomputed elsewhere and it may not register "
                             "again until restarted (a new process). Raise it for models whose "
                             "steps are slow on their hardware")
