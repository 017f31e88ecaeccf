"""Smoke run of benchmarks/bench_scheduler.py at tiny sizes, on a tiny random-weight model: it runs
to the end and prints its three tables. No timing is checked (the numbers mean nothing on a shared
test machine)."""

import pathlib
import subprocess
import sys

from pagedserve.testing.tiny_models import save_tiny_llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scheduler.py"


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def test_quick_run_prints_the_three_tables(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    report_file = tmp_path / "bench.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(model_dir), "--kv-model",
         str(model_dir), "--threads", "1", "--output-markdown", str(report_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    out = result.stdout
    plan = table_rows(out, "| overlap | schedule() median")
    assert [row[0] for row in plan] == ["off", "on"]
    assert all(cell.endswith(" ms") for row in plan for cell in row[1:5])

    overlap = table_rows(out, "| overlap | steps | mean step time | idle / step time")
    assert [row[0] for row in overlap] == ["off", "on"]
    assert all(int(row[1]) > 0 and row[3].endswith("%") for row in overlap)

    waste = table_rows(out, "| waste (allocated - used) / allocated")
    assert len(waste) == 1 and all(cell.endswith("%") for cell in waste[0][1:])
    fit = table_rows(out, "| KV per request | slots per request | requests that fit")
    assert fit[0][0] == "reserve max_model_len" and len(fit) == 3

    assert "CPU:" in out and "torch" in out
    assert "--quick" in out  # the command line
    assert report_file.read_text() == out
