"""benchmarks/bench_decode_attention_cpu.py on a small shape and one round: each cache dtype is
timed over its own layers' caches and reported against the first."""

import pathlib
import re
import subprocess
import sys

import pytest

from pagedserve.kernels import cpu_kernels

SCRIPT = (pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
          / "bench_decode_attention_cpu.py")


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no CPU kernels")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_each_cache_dtype_is_timed_against_the_first(dtype):
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--context", "40",
                           "--layers", "2", "--repeats", "1", "--dtype", dtype,
                           "--kv-cache-dtype", "auto", "fp8_e5m2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = re.findall(rf"^kv (\S+), {dtype} queries, batch 2, context ~40, 2 layers x 1: "
                       r"([\d.]+) ms \(([\d.]+)x\)", done.stdout, re.MULTILINE)
    assert [name for name, _, _ in lines] == ["auto", "fp8_e5m2"]
    assert lines[0][2] == "1.00"  # the first dtype is the baseline
    assert all(float(ms) > 0 for _, ms, _ in lines)
