"""benchmarks/bench_grouped_bits_cpu.py on one batch size and one round: both layouts of each
width compute the dequantized product (4-bit values by 16-bit activations too), and the packed
one holds its values in 4, 5 or 6 bits where the other holds a byte each."""

import json
import pathlib
import subprocess
import sys

import pytest

from pagedserve.kernels import cpu_kernels

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_grouped_bits_cpu.py"


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no CPU kernels")
def test_both_layouts_compute_the_product_and_the_packed_one_is_smaller(tmp_path):
    out = tmp_path / "bits.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())["batches"]["2"]
    assert set(figures) == {"Q4_1 in 4 bits", "Q4_1 in 8 bits", "Q4_1 by 16-bit x",
                            "Q5_K in 5 bits", "Q5_K in 8 bits", "Q6_K in 6 bits", "Q6_K in 8 bits",
                            "bf16 packed"}
    for f in figures.values():
        assert f["max_rel_err"] < 1e-2 and f["step_ms"] > 0  # bf16 activations
    # Every weight's values (channels padded to 16): 30 layers' and the LM head's.
    values = 30 * (576 * 576 * 2 + 192 * 576 * 2 + 1536 * 576 * 3) + 49152 * 576
    for fmt, bits in (("Q4_1", 4), ("Q5_K", 5), ("Q6_K", 6)):
        saved = figures[f"{fmt} in 8 bits"]["weight_bytes"] \
            - figures[f"{fmt} in {bits} bits"]["weight_bytes"]
        assert saved == values * (8 - bits) // 8
    assert figures["Q4_1 by 16-bit x"]["weight_bytes"] == figures["Q4_1 in 4 bits"]["weight_bytes"]
