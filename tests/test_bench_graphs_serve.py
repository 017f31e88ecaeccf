"""Smoke run of benchmarks/bench_graphs_serve.py on a tiny random-weight model: both modes start,
serve every request and land in the summary. No timing is checked (the numbers mean nothing on
a shared test machine)."""

import json
import pathlib
import subprocess
import sys

import pytest

from pagedserve.testing.tiny_models import save_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_graphs_serve.py"

pytestmark = pytest.mark.slow


def test_both_modes_serve_and_are_summarized(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "graphs.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model_dir), "--dtype", "float32",
         "--concurrency", "1", "2", "--rounds", "1", "--input-len", "8", "--output-len", "4",
         "--random-vocab-size", "200", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert sorted((r["mode"], r["concurrency"]) for r in runs) == [
        ("eager", 1), ("eager", 2), ("graphs", 1), ("graphs", 2)]
    assert all(r["completed"] == max(8, 4 * r["concurrency"]) and r["failed"] == 0
               for r in runs)
    assert [row["concurrency"] for row in report["summary"]] == [1, 2]
    assert all(row["graphs / eager tok/s"] > 0 for row in report["summary"])
