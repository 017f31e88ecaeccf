"""The `pagedserve` command: `up` runs the whole stack; `gateway`, `scheduler` and `executor`
run one service each (as `up` does for its children, and as the Kubernetes pods do); `bench`
measures a running server (`bench serve`) or the offline engine (`bench throughput`)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

from pagedserve.runtime.flags import FlagParser

# command -> (flags module, entry-point module, one-line description). Service modules are
# imported only for the command that runs, so `--help` and the light services stay fast.
SERVICES = {
    "gateway": ("pagedserve.gateway.config", "pagedserve.gateway.server",
                "run the gateway: OpenAI-compatible HTTP and public gRPC API"),
    "scheduler": ("pagedserve.scheduler.config", "pagedserve.scheduler.server",
                  "run the scheduler: request queue, KV block tables, batching"),
    "executor": ("pagedserve.executor.config", "pagedserve.executor.server",
                 "run an executor: model weights, paged KV cache, forward passes"),
}
UP_DESCRIPTION = ("start gateway, scheduler and executors as separate processes on this "
                  "machine; Ctrl-C stops them all")
BENCH_DESCRIPTION = "benchmarks: `bench serve` (a running server), `bench throughput` (offline)"


def build_parser() -> FlagParser:
    parser = FlagParser(
        prog="pagedserve",
        description="LLM serving engine: PagedAttention, continuous batching, prefix caching, "
                    "as gRPC microservices. Every flag can also be set as a PAGEDSERVE_* "
                    "environment variable (shown in each command's --help).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser("up", help=UP_DESCRIPTION, description=UP_DESCRIPTION)
    importlib.import_module("pagedserve.entrypoints.launcher").add_arguments(up)
    for name, (flags_module, _, description) in SERVICES.items():
        sub = commands.add_parser(name, help=description, description=description)
        importlib.import_module(flags_module).add_arguments(sub)
    bench = commands.add_parser("bench", help=BENCH_DESCRIPTION, description=BENCH_DESCRIPTION)
    importlib.import_module("pagedserve.bench.cli").add_arguments(bench, add_engine_flags)
    return parser


def add_engine_flags(parser) -> None:
    """The executor's model and engine flags, for `bench throughput`'s in-process engine."""
    executor_flags = importlib.import_module(SERVICES["executor"][0])
    executor_flags.add_model_arguments(parser)
    executor_flags.add_engine_arguments(parser)


# What the commands that run the model import beyond the base install: the `executor` extra
# (pyproject.toml), left out of the gateway and scheduler image.
EXECUTOR_PACKAGES = ("torch", "safetensors", "gguf")


def runs_the_model(args) -> bool:
    return args.command in ("executor", "up") or getattr(args, "bench_command", "") == "throughput"


def missing_executor_packages() -> list[str]:
    return [name for name in EXECUTOR_PACKAGES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if runs_the_model(args) and (missing := missing_executor_packages()):
        command = " ".join(filter(None, [args.command, getattr(args, "bench_command", None)]))
        print(f"pagedserve {command}: runs the model, which needs the executor extra (not "
              f"installed: {', '.join(missing)}): pip install 'pagedserve[executor]'",
              file=sys.stderr)
        return 2
    if args.command == "up":
        return importlib.import_module("pagedserve.entrypoints.launcher").run(args)
    if args.command == "bench":
        return importlib.import_module("pagedserve.bench.cli").main(args)
    return importlib.import_module(SERVICES[args.command][1]).main(args)


if __name__ == "__main__":
    sys.exit(main())
