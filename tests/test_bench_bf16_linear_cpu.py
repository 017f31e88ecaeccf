"""benchmarks/bench_bf16_linear_cpu.py on one batch size and one round: every variant computes
the matmul (against float64) and is timed."""

import json
import pathlib
import subprocess
import sys

import pytest

from pagedserve.kernels import cpu_kernels

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_bf16_linear_cpu.py"


@pytest.mark.skipif(not cpu_kernels.bf16_linear_supported(), reason="needs AVX-512 BF16")
def test_every_variant_computes_the_matmul_and_is_timed(tmp_path):
    out = tmp_path / "linear.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())["batches"]["2"]
    assert set(figures) == {"ours", "oneDNN", "F.linear"}
    for f in figures.values():
        assert f["max_rel_err"] < 1e-2 and f["step_ms"] > 0 and f["gflops"] > 0
