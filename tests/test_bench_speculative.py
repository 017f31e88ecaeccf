"""Smoke run of benchmarks/bench_speculative.py on a tiny random-weight model with short
prompts that repeat themselves: both stacks start, both configurations run, and the report
holds the runs and the speculation counters from /metrics. No timing is checked; and the
committed input-grounded workload is what its generator writes."""

import json
import pathlib
import subprocess
import sys

import pytest

from pagedserve.testing.tiny_models import save_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_quick_run_reports_both_configurations(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    workload = tmp_path / "grounded.jsonl"
    workload.write_text("".join(
        json.dumps({"prompt": "abcd abcd abcd abcd ab" + str(i), "max_tokens": 24}) + "\n"
        for i in range(3)))
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/bench_speculative.py", "--model", str(model_dir),
         "--max-model-len", "256", "--input-grounded", str(workload), "--concurrency", "2",
         "--rounds", "1", "--skip-reference", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["config"], r["completed"]) for r in report["runs"]] == [("off", 3), ("ngram", 3)]
    off, ngram = report["runs"]
    assert off["pagedserve_spec_decode_num_drafts_total"] == 0
    assert ngram["pagedserve_spec_decode_num_drafts_total"] > 0
    (summary,) = report["summary"]
    assert summary["speedup"] == ngram["output_throughput"] / off["output_throughput"]


def test_the_input_grounded_workload_is_what_its_generator_writes():
    run = subprocess.run([sys.executable, "benchmarks/workloads/gen_input_grounded.py",
                          "--check"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    requests = [json.loads(line) for line in
                (ROOT / "benchmarks/workloads/input_grounded.jsonl").read_text().splitlines()]
    assert len(requests) == 64
    assert {r["task"] for r in requests} == {"copy", "typos", "quote", "rename"}
