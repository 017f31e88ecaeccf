"""benchmarks/compile_triton_kernels.py: every Triton kernel compiles for sm_90 (H100/H200) and
sm_80 (A100) on a machine without a GPU, through Triton's real compiler, not the interpreter
the other Triton tests run under (it accepts programs the compiler rejects)."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="triton cannot be imported; the Triton kernels "
                             "are not compiled")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "compile_triton_kernels.py"
MODULES = ("triton_activation", "triton_attention", "triton_moe", "triton_norm",
           "triton_quantization", "triton_rotary")


def launched_kernels() -> set[str]:
    """The @triton.jit functions the wrappers launch (the others are called from kernels):
    by the project's naming, those ending in _kernel."""
    return {name for module in MODULES
            for name, value in vars(importlib.import_module(f"pagedserve.kernels.{module}")).items()
            if isinstance(value, triton.runtime.KernelInterface) and name.endswith("_kernel")}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_kernel_compiles(tmp_path, arch):
    """sm_90 (H100, H200) and sm_80 (A100: no e4m3 conversion, 163 KiB of shared memory)."""
    out = tmp_path / f"sm{arch}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", str(arch), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(out.read_text())["kernels"]
    assert all(r["error"] is None for r in results)
    compiled = {r["kernel"] for r in results}
    assert compiled == launched_kernels()
    variants = {r["variant"] for r in results}
    assert {"decode 4 x 4k (split-K)", "prefill 512 tokens varlen", "grouped linear 5-bit g=32",
            "prefill head 256 fp32"} <= variants
    assert {r["kernel"] for r in results if r["variant"] == "decode 4 x 4k (split-K)"} == {
        "_paged_attention_decode_kernel", "_paged_attention_reduce_kernel"}
    if arch != 90:
        return
    # On sm_90 the launch shapes the executor picks for the 8B shape keep their registers.
    for variant in ("decode 64 x 1k", "prefill 512 tokens", "prefill 512 tokens varlen"):
        assert all(r["spilled_bytes"] == 0 for r in results if r["variant"] == variant)
