"""benchmarks/bench_attention_cpu.py on one case and one round: it times the kernel, counts its
FLOPs, and measures its error against float64 beside bfloat16's own rounding."""

import json
import pathlib
import subprocess
import sys

import pytest

from pagedserve.kernels import cpu_kernels

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention_cpu.py"


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no CPU kernels")
def test_one_decode_case_is_timed_and_its_error_measured(tmp_path):
    out = tmp_path / "attention.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cases", "decode32x250", "--repeats",
                           "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(out.read_text())["results"]
    assert result["case"] == "decode32x250" and result["ms_per_layer"] > 0
    # 32 queries x 250 positions x 9 heads x 64 dims x (q.K + P.V) x 2 FLOP
    assert result["gflops"] == pytest.approx(32 * 250 * 9 * 64 * 4 / result["ms_per_layer"] / 1e6,
                                             rel=1e-2)
    assert 0 < result["bf16_floor_mean"] <= result["mean_error"] <= 2 * result["bf16_floor_mean"]
