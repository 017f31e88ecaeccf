"""`pagedserve bench serve` and `pagedserve bench throughput`: flags and entry point.

Flag names follow `vllm bench serve` / `vllm bench throughput` where they exist, so commands
carry over between engines. This module imports only the standard library and pagedserve's
light modules at the top; the benchmark itself is imported by the command that runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Callable

from pagedserve.runtime.flags import add_common_flags

DEFAULT_NUM_PROMPTS = 100
# Random prompts draw ids below this unless --random-vocab-size says otherwise: it is within
# the vocabulary of every family pagedserve serves (LLaMA-2's is the smallest, 32000), so a
# random prompt is valid on any of them. `bench throughput` uses the model's own vocabulary.
DEFAULT_RANDOM_VOCAB_SIZE = 32000
SERVE_DESCRIPTION = ("load generator for a running server: OpenAI-compatible HTTP (pagedserve, "
                     "vLLM, llama.cpp) or pagedserve's gRPC API; reports throughput and "
                     "TTFT / TPOT / ITL / E2EL like `vllm bench serve`")
THROUGHPUT_DESCRIPTION = ("offline throughput: the workload in-process through "
                          "pagedserve.entrypoints.offline.LLM, with the engine's own counters")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def request_rate(text: str) -> float:
    """Requests per second: a positive number, or inf (everything at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'inf': {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be positive (or inf), got {text}")
    return value


def request_rates(text: str) -> list[float]:
    return [request_rate(part.strip()) for part in text.split(",") if part.strip()]


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags both benchmarks (and benchmarks/hf_baseline.py) take."""
    parser.add_argument("--dataset", default="random", choices=["random", "jsonl"],
                        help="random: random token ids of --input-len / --output-len; jsonl: "
                             "one request per line of --dataset-path")
    parser.add_argument("--dataset-path", type=pathlib.Path, default=None,
                        help="JSONL workload: per line `prompt_token_ids` and/or `prompt`, and "
                             "`max_tokens` or `output_len`")
    parser.add_argument("--num-prompts", type=positive_int, default=None,
                        help=f"requests to run; unset: {DEFAULT_NUM_PROMPTS} random ones, or "
                             "every line of a JSONL file")
    parser.add_argument("--input-len", type=positive_int, default=256,
                        help="random dataset: prompt tokens per request")
    parser.add_argument("--output-len", type=positive_int, default=128,
                        help="random dataset: output tokens per request")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random dataset: lengths drawn uniformly within "
                             "[len * (1 - r), len * (1 + r)]")
    parser.add_argument("--random-vocab-size", type=positive_int, default=None,
                        help="random dataset: token ids are drawn below this; unset: the "
                             f"model's vocabulary offline, {DEFAULT_RANDOM_VOCAB_SIZE} for "
                             "a server")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random dataset and of the Poisson arrivals")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of how requests run, in both benchmarks."""
    parser.add_argument("--ignore-eos", action="store_true",
                        help="generate exactly the requested output length (ignore_eos)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of every request; 0: greedy")
    parser.add_argument("--num-warmups", type=int, default=1,
                        help="short untimed requests first, together (prompts reversed, so "
                             "they prime no prefix-cache entry of the workload)")
    parser.add_argument("--result-json", type=pathlib.Path, default=None,
                        help="also write the result (with the command's settings) here")
    add_common_flags(parser)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from pagedserve.bench.serve import BACKENDS, DEFAULT_BASE_URLS, DEFAULT_ENDPOINTS

    parser.add_argument("--backend", default="openai", choices=BACKENDS,
                        help="openai: /v1/completions; openai-chat: /v1/chat/completions "
                             "(needs text prompts); grpc: pagedserve.v1.Generation")
    parser.add_argument("--base-url", default=None,
                        help=f"server address; unset: {DEFAULT_BASE_URLS['openai']} for HTTP, "
                             f"{DEFAULT_BASE_URLS['grpc']} for grpc")
    parser.add_argument("--endpoint", default=None,
                        help=f"HTTP path; unset: {DEFAULT_ENDPOINTS['openai']} (openai) or "
                             f"{DEFAULT_ENDPOINTS['openai-chat']} (openai-chat)")
    parser.add_argument("--model", default=None,
                        help="model name sent in each request; unset: the server's first "
                             "(GET /v1/models, or ListModels)")
    parser.add_argument("--request-rate", type=request_rate, default=math.inf,
                        help="requests per second, Poisson arrivals; inf: all at once")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="most requests in flight; unset: no limit")
    parser.add_argument("--sweep-rates", type=request_rates, default=None,
                        help="comma-separated request rates (e.g. 1,2,4,inf): run each and "
                             "draw throughput against latency into --plot-file")
    parser.add_argument("--plot-file", type=pathlib.Path, default=pathlib.Path("bench-sweep.png"),
                        help="PNG written by --sweep-rates")
    parser.add_argument("--extra-body", type=json_object, default={},
                        help='JSON object merged into every HTTP request body, e.g. '
                             '\'{"min_tokens": 64}\'')
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--request-timeout", type=float, default=3600.0,
                        help="seconds one request may take before it counts as failed")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    add_dataset_arguments(parser)
    add_run_arguments(parser)


def add_throughput_arguments(parser: argparse.ArgumentParser,
                             engine_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    add_dataset_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn automatic prefix caching off")
    parser.add_argument("--no-overlap", action="store_true",
                        help="keep one step in flight instead of two")
    engine_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser,
                  engine_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `bench` command's subcommands. `engine_arguments` adds the executor's model and
    engine flags to `throughput`; the caller supplies it because only the command line may
    import a service (tests/test_boundaries.py)."""
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    add_serve_arguments(commands.add_parser("serve", help=SERVE_DESCRIPTION,
                                            description=SERVE_DESCRIPTION))
    add_throughput_arguments(commands.add_parser("throughput", help=THROUGHPUT_DESCRIPTION,
                                                 description=THROUGHPUT_DESCRIPTION),
                             engine_arguments)


def load_requests(args: argparse.Namespace, vocab_size: int):
    """The workload the flags describe; random ids below `vocab_size` unless
    --random-vocab-size is given."""
    from pagedserve.bench.datasets import DatasetError, length_range, load_jsonl, random_requests

    if args.dataset == "jsonl":
        if args.dataset_path is None:
            raise DatasetError("--dataset jsonl needs --dataset-path")
        return load_jsonl(args.dataset_path, args.num_prompts)
    return random_requests(args.num_prompts or DEFAULT_NUM_PROMPTS,
                           length_range(args.input_len, args.range_ratio),
                           length_range(args.output_len, args.range_ratio),
                           args.random_vocab_size or vocab_size, args.seed)


def dataset_info(args: argparse.Namespace, num_prompts: int) -> dict:
    """The workload's settings, recorded next to its result."""
    if args.dataset == "jsonl":
        return {"dataset": "jsonl", "dataset_path": str(args.dataset_path),
                "num_prompts": num_prompts}
    return {"dataset": "random", "num_prompts": num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "range_ratio": args.range_ratio, "seed": args.seed}


def run_serve(args: argparse.Namespace) -> tuple[dict, bool]:
    """The serve benchmark the flags describe: (result JSON, whether every request passed)."""
    from pagedserve.bench import serve

    requests = load_requests(args, DEFAULT_RANDOM_VOCAB_SIZE)
    config = serve.ServeConfig(
        backend=args.backend, base_url=args.base_url or serve.DEFAULT_BASE_URLS[args.backend],
        endpoint=args.endpoint or serve.DEFAULT_ENDPOINTS.get(args.backend, ""),
        model=args.model, max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        temperature=args.temperature, extra_body=args.extra_body, api_key=args.api_key,
        request_timeout_s=args.request_timeout, seed=args.seed, num_warmups=args.num_warmups,
        show_progress=not args.disable_tqdm)
    results = serve.run(config, requests, args.sweep_rates or [args.request_rate])
    for result in results:
        print(serve.format_result(result))
    runs = [{**result.to_dict(), **dataset_info(args, len(requests))} for result in results]
    for run in runs:
        run.pop("api_key", None)  # a result file is for sharing
    if args.sweep_rates:
        serve.plot_sweep(results, args.plot_file)
        print(f"throughput-vs-latency plot: {args.plot_file}")
        output = {"sweep": runs, "plot_file": str(args.plot_file)}
    else:
        output = runs[0]
    return output, all(r.metrics.failed == 0 for r in results)


def run_throughput(args: argparse.Namespace) -> tuple[dict, bool]:
    """The offline benchmark the flags describe: (result JSON, True)."""
    from pagedserve.bench import throughput
    from pagedserve.entrypoints.offline import EngineConfig

    engine_options = {k: v for k, v in dataclasses.asdict(EngineConfig.from_args(args)).items()
                      if k != "model"}
    llm = throughput.build_llm(args.model, {**engine_options,
                                            "enable_prefix_caching": not args.no_prefix_caching,
                                            "overlap": not args.no_overlap})
    with llm:  # stops the tensor-parallel ranks, if any
        requests = load_requests(args, llm.pool_limits.vocab_size)
        throughput.warm_up(llm, requests, args.num_warmups)
        result = throughput.run_offline(llm, requests, ignore_eos=args.ignore_eos,
                                        temperature=args.temperature)
    print(throughput.format_result(result))
    return {"model": str(llm.tokenizer_dir), **engine_options,
            "enable_prefix_caching": not args.no_prefix_caching, "overlap": not args.no_overlap,
            **dataset_info(args, len(requests)), **result.to_dict()}, True


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 0, 1 when a request failed, 2 when it could not run."""
    from pagedserve.bench.datasets import DatasetError
    from pagedserve.bench.serve import BenchError
    from pagedserve.runtime.log import configure_logging
    from pagedserve.runtime.serving import StartupError

    configure_logging("bench", args.log_level, args.log_format)
    runner = run_serve if args.bench_command == "serve" else run_throughput
    try:
        output, passed = runner(args)
    except (BenchError, DatasetError, StartupError) as exc:
        print(f"pagedserve bench {args.bench_command}: {exc}", file=sys.stderr)
        return 2
    if args.result_json is not None:
        args.result_json.write_text(json.dumps(output, indent=2, default=str) + "\n")
    return 0 if passed else 1
