"""A follower rank of a tensor-parallel executor (tp_group.py): started by rank 0, never by hand,
as `python -m pagedserve.executor.tp_follower --rank R --init-method ...` with rank 0's model
and engine flags. It builds its slice of the model, joins the group, then runs each plan rank 0
relays on its stdin until the pipe closes."""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

import structlog

from pagedserve.executor.bootstrap import build_runner
from pagedserve.executor.config import EngineConfig, add_engine_arguments, add_model_arguments
from pagedserve.executor.model_files import default_cache_dir, resolve_model
from pagedserve.executor.runner import ModelRunner
from pagedserve.executor.tp_group import read_messages
from pagedserve.runtime.flags import add_common_flags
from pagedserve.runtime.log import configure_logging
from pagedserve.runtime.serving import StartupError

log = structlog.get_logger(__name__)


def follow(runner: ModelRunner, stream: BinaryIO) -> None:
    """A follower's life after loading: run each plan rank 0 sends, until its stdin closes."""
    for plan in read_messages(stream):
        if plan is None:
            runner.reset()
        else:
            runner.step(plan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedserve.executor.tp_follower",
                                     description="a follower rank of a tensor-parallel executor "
                                                 "(started by rank 0, not by hand)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    configure_logging(f"executor-rank-{args.rank}", args.log_level, args.log_format)
    config = EngineConfig.from_args(args)
    try:
        model_dir = resolve_model(config.model, config.model_cache_dir or default_cache_dir(),
                                  config.served_model_name, config.gguf_dequantize)
        runner = build_runner(config, model_dir, rank=args.rank, init_method=args.init_method)
    except StartupError as exc:
        log.error("cannot start", rank=args.rank, error=str(exc))
        return 1
    follow(runner, sys.stdin.buffer)
    runner.close()  # a follower holds no followers: this leaves the process group
    return 0


if __name__ == "__main__":
    sys.exit(main())
