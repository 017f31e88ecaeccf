"""Smoke run of benchmarks/bench_http_vs_offline.py at tiny sizes, on a tiny random-weight model:
it starts `pagedserve up`, runs both engines and prints its table. No timing is checked (the
numbers mean nothing on a shared test machine)."""

import pathlib
import subprocess
import sys

import pytest

from pagedserve.testing.tiny_models import save_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_http_vs_offline.py"

pytestmark = pytest.mark.slow


def test_quick_run_prints_the_table(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    report_file = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(model_dir),
         "--output-markdown", str(report_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    out = result.stdout
    lines = out.splitlines()
    start = lines.index("| engine | wall s | output tok/s | ratio HTTP/offline (tok/s) |")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[start + 2:start + 4]]
    assert [row[0] for row in rows] == ["offline `LLM`", "HTTP `pagedserve up`"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    assert float(rows[1][3]) > 0
    assert "Target: HTTP ≥ 95% of offline output tok/s:" in out
    assert "4 requests" in out and "8 output tokens each" in out
    assert "CPU:" in out and "--quick" in out
    assert out.endswith(report_file.read_text())  # stdout also has the engine's log lines
