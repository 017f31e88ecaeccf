"""benchmarks/bench_decode_step.py keeps running: a tiny mixed batch (a decode and a prefill)
over scattered block tables, one round, and a report whose attention share is part of (so at
most) the step it was measured in."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_step.py"


@pytest.mark.parametrize("kernels", ["cpu", "torch"])
def test_the_decode_step_benchmark_reports_step_and_attention(kernels):
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--repeats", "1", "--block-order", "scattered", "--prefills", "1",
                           "--prefill-len", "20", "--kernels", kernels],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{kernels} kernels, batch 2 (1 prefills of 20 tokens)" in done.stdout
    assert "scattered blocks" in done.stdout
    match = re.search(r"step ([\d.]+) ms, attention ([\d.]+) ms", done.stdout)
    assert match, done.stdout
    step, attention = map(float, match.groups())
    assert 0 < attention <= step
