"""Smoke run of benchmarks/bench_executor.py on a tiny random-weight model: it runs to the end and
prints its table. No timing is checked (the numbers mean nothing on a shared test machine)."""

import pathlib
import subprocess
import sys

from pagedserve.testing.tiny_models import save_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_executor.py"


def test_quick_run_prints_the_table(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    report_file = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(model_dir), "--threads", "1",
         "--output-markdown", str(report_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    out = result.stdout
    assert "| workload | pagedserve | transformers | time ratio paged/transformers" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "workload" not in line]
    assert [row.split("|")[1].strip() for row in rows] == [
        "decode, batch 1, context 16", "decode, batch 4, context 16", "prefill, 4 × 16 tokens"]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert len(cells) == 5, row
        assert float(cells[4]) < 1e-3, row  # both engines computed the same logits
    assert "dtype: float32" in out and "threads: 1" in out
    assert "--quick" in out  # the command line
    assert report_file.read_text() == out
