"""benchmarks/bench_decode_step.py keeps running: a tiny mixed batch (a decode and a prefill)
over scattered block tables, one round, and a report whose attention share is part of (so at
most) the step it was measured in; with several quantization modes, one report per mode."""

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
    assert f"{kernels} kernels, quantization none, batch 2 (1 prefills of 20 tokens)" \
        in done.stdout
    assert "scattered blocks" in done.stdout
    match = re.search(r"step ([\d.]+) ms \(1.00x none\), attention ([\d.]+) ms", done.stdout)
    assert match, done.stdout
    step, attention = map(float, match.groups())
    assert 0 < attention <= step


def test_each_quantization_mode_gets_its_report():
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--repeats", "1", "--quantization", "none", "w8a8_int8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = re.findall(r"quantization (\S+), .* step ([\d.]+) ms \(([\d.]+)x none\)",
                         done.stdout)
    assert [mode for mode, *_ in reports] == ["none", "w8a8_int8"], done.stdout
    assert reports[0][2] == "1.00" and float(reports[1][1]) > 0
