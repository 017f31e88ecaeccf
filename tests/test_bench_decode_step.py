"""benchmarks/bench_decode_step.py keeps running: a tiny mixed batch (a decode and a prefill)
over scattered block tables, one round, and a report whose attention share is part of (so at
most) the step it was measured in; with several quantization modes, one report per mode; with
--graphs, each mode's replayed step beside its eager one."""

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
    assert (f"{kernels} kernels, bfloat16, quantization none, kv auto, batch 2 (1 prefills of 20 "
            "tokens)") in done.stdout
    assert "scattered blocks" in done.stdout
    match = re.search(r"step ([\d.]+) ms \(1.00x\), attention ([\d.]+) ms", done.stdout)
    assert match, done.stdout
    step, attention = map(float, match.groups())
    assert 0 < attention <= step


def test_each_mode_gets_its_report():
    """Every (weights, KV cache) pair, the first the baseline."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--repeats", "1", "--quantization", "none", "w8a8_int8",
                           "--kv-cache-dtype", "auto", "fp8_e4m3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = re.findall(r"quantization (\S+), kv (\S+), .* step ([\d.]+) ms \(([\d.]+)x\)",
                         done.stdout)
    assert [tuple(r[:2]) for r in reports] == [
        ("none", "auto"), ("none", "fp8_e4m3"), ("w8a8_int8", "auto"),
        ("w8a8_int8", "fp8_e4m3")], done.stdout
    assert reports[0][3] == "1.00" and all(float(r[2]) > 0 for r in reports)


def test_each_way_of_running_float_linears_gets_its_report():
    """--linears c torch: the kernel set's packed matmuls, then PyTorch's on the plain weight,
    in the dtype asked for, the weights rounded to bfloat16 when asked."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--repeats", "1", "--dtype", "float32", "--bf16-weights",
                           "--linears", "c", "torch"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = re.findall(r"float32 \(weights rounded to bfloat16\), quantization none, kv auto, "
                         r"linears (\S+), .* step ([\d.]+) ms \(([\d.]+)x\)", done.stdout)
    assert [r[0] for r in reports] == ["c", "torch"], done.stdout
    assert reports[0][2] == "1.00" and all(float(r[1]) > 0 for r in reports)


def test_graphs_add_a_replayed_step_per_mode():
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--repeats", "1", "--quantization", "none", "gguf", "--graphs"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reports = re.findall(r"quantization (\S+), kv auto(, graphs)?, .* step ([\d.]+) ms .*"
                         r"attention (\S+)", done.stdout)
    assert [r[:2] for r in reports] == [("none", ""), ("none", ", graphs"), ("gguf", ""),
                                        ("gguf", ", graphs")], done.stdout
    assert [r[3] == "-" for r in reports] == [False, True, False, True]
