"""The engine's configuration, `EngineConfig`, and the flags of `pagedserve executor` (each also
settable as a PAGEDSERVE_* variable).

Every option of the engine (which model, and how it runs) is a field of `EngineConfig`, with
its default; the model and engine flags are generated from nowhere else: they take their
defaults from the fields (tests/test_flags.py checks the two agree, field by field). A config
is parsed once, from the flags (`from_args`) or from keyword arguments (`from_options`, the
offline `LLM(**options)`), and passed on to child processes as flags (`to_argv`: tensor-parallel
followers, and `pagedserve up`'s executors).

Importing this module stays light (no torch), so `pagedserve --help` is fast."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from pagedserve.runtime.flags import add_common_flags, passed_on

DEFAULT_PORT = 50053


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The model an executor serves and how it runs it (each field is the flag of its name)."""

    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    model_cache_dir: pathlib.Path | None = None
    gguf_dequantize: bool = False
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None  # None: the weights keep the dtype
    attention_backend: str = "auto"
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    kv_cache_gib: float = 4.0
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's context length
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_logprobs: int = 20
    # vLLM's --speculative-config JSON (executor/speculative.py); None: no speculation. The
    # offline LLM takes a dict too (from_options writes it as JSON).
    speculative_config: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineConfig:
        """The config parsed flags hold (a namespace from a parser with the engine flags)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        """A config from keyword arguments (dtype="bfloat16"), naming any unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        if isinstance(options.get("speculative_config"), dict):
            options["speculative_config"] = json.dumps(options["speculative_config"])
        return cls(**options)

    def to_argv(self) -> list[str]:
        """The config as the flags of a child process that parses them back (`from_args`);
        options left unset (None) are left out, and the child takes the same default."""
        return passed_on(self, add_model_arguments, add_engine_arguments)


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
    parser.add_argument("--model", default=EngineConfig.model,
                        help="local Hugging Face model directory or .gguf file; unset: the "
                             "embedded SmolLM2-135M-Instruct")
    parser.add_argument("--served-model-name", default=EngineConfig.served_model_name,
                        help="name clients use in the `model` field; unset: the model "
                             "directory's name")
    parser.add_argument("--model-cache-dir", type=pathlib.Path,
                        default=EngineConfig.model_cache_dir,
                        help="where GGUF models are converted to, once; unset: "
                             "$XDG_CACHE_HOME/pagedserve or ~/.cache/pagedserve")
    parser.add_argument("--gguf-dequantize", action="store_true",
                        default=EngineConfig.gguf_dequantize,
                        help="load a GGUF model's weights dequantized to float (then cast to "
                             "--dtype) instead of running its quantized formats (Q8_0, Q4_0, "
                             "Q4_1, Q5_0, Q5_1, Q2_K to Q6_K) natively "
                             "(docs/quantization.md)")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=EngineConfig.device,
                        choices=["auto", "cpu", "cuda"],
                        help="where the model runs; auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default=EngineConfig.dtype,
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="compute dtype of weights and KV cache; auto: bfloat16 on cuda and "
                             "on CPUs with AVX-512 BF16 or AMX, else float32 (float16 is cuda "
                             "only)")
    parser.add_argument("--quantization", default=EngineConfig.quantization,
                        choices=["int8", "w8a8_int8", "fp8", "gptq", "awq"],
                        help="quantize the linear layers' weights per output channel as the "
                             "model loads (docs/quantization.md): int8 = int8 weight-only "
                             "(activations keep --dtype); w8a8_int8 = activations quantized "
                             "per token too, faster where matmuls are bound by arithmetic "
                             "(large batches on a CPU with AVX-512 VNNI); fp8 = e4m3 weights "
                             "and per-token activations on fp8 tensor cores (CUDA compute "
                             "capability 8.9+); gptq, awq: the model is a checkpoint of that "
                             "method (refused otherwise), which loads as it is; unset: a "
                             "quantized checkpoint loads as its config.json says, a float one "
                             "in --dtype")
    parser.add_argument("--attention-backend", default=EngineConfig.attention_backend,
                        choices=["auto", "torch", "cpu", "triton"],
                        help="implementation of the executor's kernels (paged attention, KV "
                             "write, norms, rotary, SiLU-and-mul): triton = the Triton kernels, "
                             "torch = the PyTorch path, cpu = the PyTorch path with decode "
                             "attention in a C kernel built at first use; auto: triton on "
                             "cuda, cpu on cpu (torch when no C compiler is found; triton on "
                             "cpu runs under TRITON_INTERPRET=1: for checks only)")
    parser.add_argument("--enforce-eager", action="store_true",
                        default=EngineConfig.enforce_eager,
                        help="run every step eagerly: capture no decode graphs (by default, "
                             "with one rank, decode-only steps replay graphs captured at "
                             "start-up: CUDA graphs on cuda with the triton kernels, for "
                             "batch sizes up to --max-num-seqs, at most 512; CPU graphs of "
                             "the C kernels on cpu, every size up to 64; docs/design.md §5)")
    parser.add_argument("--tensor-parallel-size", type=int,
                        default=EngineConfig.tensor_parallel_size,
                        help="split the model's layers over this many processes, one per GPU "
                             "(cuda:0 .. cuda:N-1; on cpu, N processes sharing the cores), "
                             "which this executor starts and serves as one")
    parser.add_argument("--block-size", type=int, default=EngineConfig.block_size,
                        help="tokens per KV cache block")
    parser.add_argument("--kv-cache-dtype", default=EngineConfig.kv_cache_dtype,
                        choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                        help="dtype of the KV cache: auto = the model's --dtype; fp8 "
                             "(= fp8_e4m3: 3 mantissa bits, values up to 448) or fp8_e5m2 (2 "
                             "bits, up to 57344) store one byte per value, twice the tokens "
                             "of bfloat16 in the same memory (docs/quantization.md)")
    parser.add_argument("--kv-cache-gib", type=float, default=EngineConfig.kv_cache_gib,
                        help="KV cache size on cpu, in GiB")
    parser.add_argument("--gpu-memory-utilization", type=float,
                        default=EngineConfig.gpu_memory_utilization,
                        help="fraction of the GPU's memory for weights, activations and KV "
                             "cache (cuda)")
    parser.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len,
                        help="most tokens (prompt + output) per sequence; unset: the model's "
                             "context length")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                        help="most sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        default=EngineConfig.max_num_batched_tokens,
                        help="most tokens computed in one step (the GPU's KV capacity is "
                             "profiled at this budget)")
    parser.add_argument("--max-logprobs", type=int, default=EngineConfig.max_logprobs,
                        help="most top logprobs per position a request may ask for")
    parser.add_argument("--speculative-config", default=EngineConfig.speculative_config,
                        help="speculative decoding, as vLLM's JSON: {\"method\": \"ngram\", "
                             "\"num_speculative_tokens\": 3, \"prompt_lookup_max\": 4, "
                             "\"prompt_lookup_min\": 2, \"disable_by_batch_size\": 16}, or a "
                             "draft model with the model's tokenizer: {\"model\": "
                             "\"/path/to/draft\", \"num_speculative_tokens\": 3}; "
                             "greedy and seeded outputs stay token for token what they are "
                             "without it (docs/speculative_decoding.md); unset: none")
