"""Decode graphs end to end over HTTP: `pagedserve up` with its decode graphs (the default) against
the same stack with --enforce-eager, fresh stacks, alternated, driven by `pagedserve bench serve`
at several concurrencies (docs/performance.md, "Decode steps replayed on the CPU").

    .venv/bin/python benchmarks/bench_graphs_serve.py --out benchmarks/results/graphs_serve_cpu.json
        [--model DIR --dtype bfloat16] [--concurrency 1 8 32] [--rounds 2]

Each concurrency C runs max(8, 4 C) random requests of --input-len prompt tokens and
--output-len output tokens (EOS ignored, greedy, fixed seed) with at most C in flight, so C
is the decode batch for most of the run. Records output tok/s, TTFT, TPOT and ITL per run,
and the seconds each stack took to answer /ready (the capture is counted in start-up);
prints each mode's medians over rounds and graphs / eager.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from machine_info import cpu_info

from pagedserve.testing.processes import running_stack

MODES = {"graphs": [], "eager": ["--enforce-eager"]}
REPORTED = ("output_throughput", "median_ttft_ms", "mean_tpot_ms", "median_itl_ms",
            "p99_itl_ms", "completed", "failed")


def bench(url: str, concurrency: int, args: argparse.Namespace, result: pathlib.Path) -> dict:
    argv = [sys.executable, "-m", "pagedserve", "bench", "serve", "--base-url", url,
            "--dataset", "random", "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--num-prompts", str(max(8, 4 * concurrency)),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0",
            "--seed", "0", "--num-warmups", "2", "--disable-tqdm", "--result-json", str(result)]
    if args.random_vocab_size:
        argv += ["--random-vocab-size", str(args.random_vocab_size)]
    if subprocess.run(argv, stdout=subprocess.DEVNULL).returncode not in (0, 1):
        raise RuntimeError(f"pagedserve bench serve could not run: {' '.join(argv)}")
    output = json.loads(result.read_text())
    return {key: output.get(key) for key in REPORTED}


def run_once(mode: str, args: argparse.Namespace, scratch: pathlib.Path,
             round_: int) -> list[dict]:
    flags = [*(["--model", args.model] if args.model else []), "--dtype", args.dtype,
             *MODES[mode]]
    started = time.perf_counter()
    with running_stack(scratch / f"{mode}-{round_}.log", *flags) as url:
        ready_s = round(time.perf_counter() - started, 1)
        runs = []
        for concurrency in args.concurrency:
            run = {"mode": mode, "round": round_, "concurrency": concurrency,
                   "ready_s": ready_s, **bench(url, concurrency, args, scratch / "result.json")}
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    summary = []
    for concurrency in sorted({r["concurrency"] for r in runs}):
        row: dict = {"concurrency": concurrency}
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["concurrency"] == concurrency]
            for key in ("output_throughput", "mean_tpot_ms", "median_itl_ms", "p99_itl_ms",
                        "median_ttft_ms", "ready_s"):
                row[f"{mode} {key}"] = round(statistics.median(r[key] for r in mine), 2)
        row["graphs / eager tok/s"] = round(row["graphs output_throughput"]
                                            / row["eager output_throughput"], 3)
        summary.append(row)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="unset: the embedded default model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-vocab-size", type=int, default=None,
                        help="token ids drawn below this (a model with a small vocabulary)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            # Alternated, each mode first in every other round.
            for mode in list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]:
                runs += run_once(mode, args, pathlib.Path(scratch), round_)
    summary = summarize(runs)
    model, cores = cpu_info()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    args.out.write_text(json.dumps({"machine": {"cpu": model, "cores": cores},
                                    "commit": commit, "args": vars(args) | {"out": str(args.out)},
                                    "runs": runs, "summary": summary}, indent=1))
    for row in summary:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
