"""Microservice overhead: the same workload through `pagedserve up`'s HTTP API and in-process.

Both engines run the same model (default: the embedded SmolLM2-135M-Instruct, float32) on the
same machine, in one run of this script:

- **offline**: ``pagedserve.entrypoints.offline.LLM`` (scheduler and executor in this process, no
  gRPC). ``LLM()`` is built once (not timed) and warmed up with the full workload on other prompts
  (not timed); then one ``generate`` call over all prompts is timed.
- **HTTP**: ``pagedserve up`` as a subprocess (gateway -> scheduler -> executor, each its own
  process, on free loopback ports). Once the "pagedserve is up" line is printed and GET /ready
  answers 200, the warm-up workload is sent (not timed); then the requests go through
  ``pagedserve bench serve``'s load generator (``pagedserve.bench.serve``): all at once,
  streamed from POST /v1/completions (``prompt`` = the token ids, ``max_tokens``,
  ``temperature`` 0, ``ignore_eos``), timed from the first send to the last response.
  Each response's ``usage.completion_tokens`` must equal the requested length. The stack is
  stopped with SIGTERM at the end.

The offline side is ``pagedserve bench throughput``'s (``pagedserve.bench.throughput``); this
script adds the stack's lifecycle, the alternation and the ratio.

Workload: ``--num-prompts`` (default 32) prompts of random token ids (``--seed``) with lengths
32-256, ``--output-len`` (default 64) output tokens each, greedy, ignore_eos. Output tokens/s =
total output tokens / wall time. Target: HTTP ≥ 95% of offline. ``--repeats N`` alternates the
two engines N times (offline first) and reports every run plus the median; each repeat uses new
prompts (seed + repeat), so no run hits the prefix cache filled by an earlier one.

Run from the repository root (on an otherwise idle machine, for numbers worth keeping):

    .venv/bin/python benchmarks/bench_http_vs_offline.py
    .venv/bin/python benchmarks/bench_http_vs_offline.py --output-markdown bench-http.md
    .venv/bin/python benchmarks/bench_http_vs_offline.py --quick --model DIR   # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from pagedserve.bench import serve, throughput
from pagedserve.bench.datasets import BenchRequest, random_requests
from pagedserve.runtime.serving import free_ports

ROOT = pathlib.Path(__file__).resolve().parents[1]
READY_LINE = "pagedserve is up"
TARGET = 0.95


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--min-prompt-len", type=int, default=32)
    parser.add_argument("--max-prompt-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate offline and HTTP this many times")
    parser.add_argument("--model", default=None,
                        help="model directory or id (default: the embedded default model)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="KV cache size for both engines (default: the engine's; "
                             "0.05 with --quick)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 prompts of 8-32 tokens, 8 output tokens")
    parser.add_argument("--output-markdown", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_prompts, args.output_len = 4, 8
        args.min_prompt_len, args.max_prompt_len = 8, 32
        if args.kv_cache_gib is None:
            args.kv_cache_gib = 0.05
    return args


def make_prompts(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    return random_requests(args.num_prompts, (args.min_prompt_len, args.max_prompt_len),
                           (args.output_len, args.output_len), vocab_size, args.seed)


# --- offline ----------------------------------------------------------------------------------

def build_llm(args: argparse.Namespace):
    options = {} if args.kv_cache_gib is None else {"kv_cache_gib": args.kv_cache_gib}
    return throughput.build_llm(args.model, options)


def run_offline(llm, prompts: list[BenchRequest]) -> float:
    result = throughput.run_offline(llm, prompts, ignore_eos=True)
    if result.output_len_mismatches:
        raise RuntimeError(f"offline: {result.output_len_mismatches} requests did not get "
                           "their output length")
    return result.elapsed_s


# --- HTTP -------------------------------------------------------------------------------------

class Stack:
    """`pagedserve up` in a subprocess; its output goes to a log file (a pipe nobody reads
    would fill up and block the processes)."""

    def __init__(self, args: argparse.Namespace, log_dir: pathlib.Path):
        self.http, grpc_port, scheduler, executor = free_ports(4)
        argv = [sys.executable, "-m", "pagedserve", "up", "--http-port", str(self.http),
                "--grpc-port", str(grpc_port), "--scheduler-port", str(scheduler),
                "--executor-port", str(executor), "--startup-timeout",
                str(args.startup_timeout)]
        if args.model is not None:
            argv += ["--model", str(args.model)]
        if args.kv_cache_gib is not None:
            argv += ["--kv-cache-gib", str(args.kv_cache_gib)]
        self.stdout_file = log_dir / "up.stdout"
        self.stderr_file = log_dir / "up.stderr"
        with self.stdout_file.open("w") as out, self.stderr_file.open("w") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.http}"

    def logs(self) -> str:
        return (self.stdout_file.read_text()[-4000:] + "\n--- stderr ---\n"
                + self.stderr_file.read_text()[-4000:])

    def wait_until_ready(self, timeout_s: float) -> None:
        import httpx2 as httpx  # the httpx API; what the venv has (openai uses it too)

        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.stdout_file.read_text():
            self._check_alive(deadline)
            time.sleep(0.2)
        with httpx.Client(timeout=5.0) as client:
            while True:
                self._check_alive(deadline)
                try:
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"pagedserve up exited with status {self.process.returncode}:\n"
                               + self.logs())
        if time.monotonic() > deadline:
            raise RuntimeError("pagedserve up did not become ready in time:\n" + self.logs())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_http(url: str, prompts: list[BenchRequest]) -> float:
    config = serve.ServeConfig(backend="openai", base_url=url, endpoint="/v1/completions",
                               ignore_eos=True, num_warmups=0, show_progress=False)
    metrics = serve.run(config, prompts, [math.inf])[0].metrics
    if metrics.failed or metrics.output_len_mismatches:
        raise RuntimeError(f"HTTP: {metrics.failed} requests failed, "
                           f"{metrics.output_len_mismatches} got another output length")
    return metrics.duration_s


# --- report -----------------------------------------------------------------------------------

def cpu_info() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                return value
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines() -> list[str]:
    import torch

    return [f"- CPU: {cpu_info()}",
            f"- cores: {os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by "
            f"this process",
            f"- torch {torch.__version__}, Python {platform.python_version()}, torch threads "
            f"{torch.get_num_threads()} (this process; the executor process uses its default)"]


def report(args: argparse.Namespace, prompts: list[BenchRequest],
           runs: list[tuple[float, float]]) -> str:
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    total = len(prompts) * args.output_len
    lengths = [p.prompt_len for p in prompts]
    lines = ["# Microservice overhead: HTTP (`pagedserve up`) vs in-process offline `LLM`", "",
             *machine_lines(), "", "```", command, "```", "",
             f"Workload: {len(prompts)} requests, prompt lengths {min(lengths)}-"
             f"{max(lengths)} (total {sum(lengths)} prompt tokens), "
             f"{args.output_len} output tokens each ({total} total), greedy, ignore_eos, "
             f"seed {args.seed} (repeat i: seed + i; untimed warm-up of the same size: "
             f"seed - 1).", "",
             "| engine | wall s | output tok/s | ratio HTTP/offline (tok/s) |",
             "|---|---:|---:|---:|"]
    for i, (offline, http) in enumerate(runs):
        suffix = f" (run {i + 1})" if len(runs) > 1 else ""
        lines += [f"| offline `LLM`{suffix} | {offline:.2f} | {total / offline:.1f} | |",
                  f"| HTTP `pagedserve up`{suffix} | {http:.2f} | {total / http:.1f} "
                  f"| {offline / http:.3f} |"]
    offline = statistics.median(r[0] for r in runs)
    http = statistics.median(r[1] for r in runs)
    if len(runs) > 1:
        lines += [f"| offline `LLM` (median) | {offline:.2f} | {total / offline:.1f} | |",
                  f"| HTTP `pagedserve up` (median) | {http:.2f} | {total / http:.1f} "
                  f"| {offline / http:.3f} |"]
    ratio = offline / http
    lines += ["", f"Target: HTTP ≥ {TARGET:.0%} of offline output tok/s: "
              + ("met" if ratio >= TARGET else "not met") + f" ({ratio:.1%})."]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    llm = build_llm(args)
    vocab_size = llm.pool_limits.vocab_size
    # Every run gets prompts of its own (seed, seed + 1, ...), so that no run reuses the prefix
    # cache of an earlier one; the two engines get the same prompts within a repeat. The
    # warm-up runs the full workload (seed - 1) through each engine, not timed: the first big
    # batch of a fresh process is much slower than the next ones.
    def prompts_for(index: int) -> list[BenchRequest]:
        return make_prompts(argparse.Namespace(**{**vars(args), "seed": args.seed + index}),
                            vocab_size)

    warmup = prompts_for(-1)
    run_offline(llm, warmup)

    runs: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-http-") as log_dir:
        stack = Stack(args, pathlib.Path(log_dir))
        try:
            stack.wait_until_ready(args.startup_timeout)
            run_http(stack.url, warmup)
            for repeat in range(args.repeats):
                prompts = prompts_for(repeat)
                offline = run_offline(llm, prompts)
                http = run_http(stack.url, prompts)
                runs.append((offline, http))
                print(f"offline {offline:.2f} s, HTTP {http:.2f} s", file=sys.stderr)
        finally:
            stack.stop()

    text = report(args, prompts_for(0), runs)
    print(text, end="")
    if args.output_markdown is not None:
        args.output_markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
