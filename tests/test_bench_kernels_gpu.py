"""benchmarks/bench_kernels_gpu.py on tiny shapes on the CPU (--smoke), so that the GPU script
keeps working between the sessions that have a GPU: every kernel check runs and passes, and
every timing section reports."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels_gpu.py"


@pytest.mark.slow
def test_smoke_run_checks_every_kernel_and_reports(tmp_path):
    out = tmp_path / "results.json"
    # The end-to-end section starts engines: test_smoke_end_to_end below runs it alone.
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--skip", "e2e",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    kernels = {c["kernel"].split(" ")[0] for c in results["checks"]}
    assert {"write_kv_cache", "decode", "mixed", "rms_norm", "add_rms_norm", "rotary",
            "silu_and_mul", "grouped", "fused_moe"} <= kernels
    assert any(c["kernel"].startswith("decode + varlen prefill") for c in results["checks"])
    assert all(c["passed"] for c in results["checks"])
    assert {r["variant"] for r in results["decode"]} >= {"triton auto", "triton split 128",
                                                        "sdpa contiguous"}
    assert {"sdpa contiguous causal", "triton default, varlen (the step's K/V rows)"} <= {
        r["variant"] for r in results["prefill"]}
    assert len(results["layer_kernels"]) == 4
    # bf16 and the Triton grouped matmul (no fp8 on a CPU) at two batch sizes.
    assert {(r["kernel"], r["batch"]) for r in results["quantized_linears"]} == {
        (kernel, batch) for kernel in ("bf16 matmul", "triton grouped (values 1 byte)",
                                       "triton grouped (values 4 bits)")
        for batch in (1, 5)}
    assert {(r["variant"], r["tokens"]) for r in results["moe"]} == {
        (variant, tokens) for variant in ("triton grouped", "torch loop") for tokens in (1, 6)}


@pytest.mark.slow
def test_smoke_end_to_end_agrees_and_reproduces_seeded_sampling(tmp_path):
    """The end-to-end section (float32 only on the CPU): greedy tokens equal with the Triton and
    torch kernel sets, and seeded sampling reproduces within each engine."""
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--skip",
                           "checks,decode,prefill,layers,quantized,moe", "--json", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["kernel"]: c["passed"] for c in json.loads(out.read_text())["checks"]}
    assert checks == {"end to end greedy tokens, triton == torch": True,
                      "end to end seeded sampling reproducible, torch": True,
                      "end to end seeded sampling reproducible, triton": True}
