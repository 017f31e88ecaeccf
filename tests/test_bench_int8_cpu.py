"""benchmarks/bench_int8_cpu.py on one batch size and one round: every int8 variant it times
computes the product of the dequantized weights (against its float64 reference, within the
error its number format allows), so that the figures in docs/performance.md compare like with
like."""

import json
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_int8_cpu.py"
# Largest error relative to the output's largest value: bf16 activations (8 bits of mantissa)
# for bf16 and W8A16, int8 activations too for W8A8.
TOLERANCE = {"bf16": 1e-2, "fp32": 1e-5, "int8pack bf16": 1e-2, "int8pack fp32": 1e-5,
             "dynamic W8A8": 5e-2, "bf16 packed": 1e-2, "C W8A16": 1e-2, "C W8A8": 5e-2}


def test_every_variant_computes_the_dequantized_product(tmp_path):
    out = tmp_path / "int8.json"
    done = subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), "--batch", "2",
                           "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())["batches"]["2"]
    assert set(figures) == set(TOLERANCE)
    for name, tolerance in TOLERANCE.items():
        assert figures[name]["max_rel_err"] < tolerance, name
        assert figures[name]["step_ms"] > 0
    assert figures["bf16"]["vs_bf16"] == 1.0
