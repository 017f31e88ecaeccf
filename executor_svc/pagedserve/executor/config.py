"""Flags of `pagedserve executor` (each also settable as a PAGEDSERVE_* variable).

Importing this module stays light (no torch), so `pagedserve --help` is fast."""

import argparse
import pathlib

from pagedserve.runtime.flags import add_common_flags

DEFAULT_PORT = 50053


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on for the scheduler")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="gRPC port of the Executor service")
    parser.add_argument("--scheduler-address", default=None,
                        help="host:port of the scheduler to register with (retried until it "
                             "answers, and again whenever it restarts); unset: do not register")
    parser.add_argument("--advertise-address", default=None,
                        help="host:port the scheduler dials to reach this executor; unset: "
                             "--host:--port")
    add_model_arguments(parser)
    add_engine_arguments(parser)
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
                        help="where GGUF models are converted to, once; unset: "
                             "$XDG_CACHE_HOME/pagedserve or ~/.cache/pagedserve")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the model runs; auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype of weights and KV cache; auto: bfloat16 on cuda and "
                             "on CPUs with AVX-512 BF16 or AMX, else float32 (float16 is cuda "
                             "only)")
    parser.add_argument("--attention-backend", default="auto",
                        choices=["auto", "torch", "cpu", "triton"],
                        help="implementation of the executor's kernels (paged attention, KV "
                             "write, norms, rotary, SiLU-and-mul): triton = the Triton kernels, "
                             "torch = the PyTorch path, cpu = the PyTorch path with decode "
                             "attention in a C kernel built at first use; auto: triton on "
                             "cuda, cpu on cpu (torch when no C compiler is found; triton on "
                             "cpu runs under TRITON_INTERPRET=1: for checks only)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model's layers over this many processes, one per GPU "
                             "(cuda:0 .. cuda:N-1; on cpu, N processes sharing the cores), "
                             "which this executor starts and serves as one")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0,
                        help="KV cache size on cpu, in GiB")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of the GPU's memory for weights, activations and KV "
                             "cache (cuda)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="most tokens (prompt + output) per sequence; unset: the model's "
                             "context length")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="most sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="most tokens computed in one step (the GPU's KV capacity is "
                             "profiled at this budget)")
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="most top logprobs per position a request may ask for")
