"""Flags of `pagedserve executor` (each also settable as a PAGEDSERVE_* variable).

Importing this module stays light (no torch), so `pagedserve --help` is fast."""

import argparse
import pathlib

from pagedserve.flags import add_common_flags

DEFAULT_PORT = 50053


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for the scheduler")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gRPC port of the Executor service")
    add_model_arguments(parser)
    add_common_flags(parser)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model flags, shared with `pagedserve up`, which passes them on to its executors."""
    parser.add_argument("--model", default=None,
                        help="local Hugging Face model directory or .gguf file; unset: the "
                             "embedded SmolLM2-135M-Instruct")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients use in the `model` field; unset: the model "
                             "directory's name")
    parser.add_argument("--model-cache-dir", type=pathlib.Path, default=None,
                        help="where GGUF models are converted to once; unset: "
                             "$XDG_CACHE_HOME/pagedserve or ~/.cache/pagedserve")
