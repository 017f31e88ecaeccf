"""The CPU kernels' tests skip where the machine has no C compiler; this one makes sure that a
machine with one builds them, so that a compile error in csrc/ fails the suite instead of
skipping every kernel test (the engine itself falls back to the PyTorch path, with a warning)."""

import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest

from pagedserve.kernels import cpu_kernels

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_kernels_build_wherever_there_is_a_c_compiler():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert cpu_kernels.available()


# The kernel tests, run again against the kernels built for AVX2.
KERNEL_TESTS = ["tests/test_kernels_cpu.py", "tests/test_gguf_native.py",
                "tests/test_quantization.py", "tests/test_kv_cache_fp8.py"]


@pytest.mark.slow
def test_the_portable_kernels_pass_the_kernel_tests():
    """The kernels have AVX-512 paths and portable C for every other CPU (AVX2 ones). A
    machine runs only the paths its CPU has, so here the kernel tests run again against a
    build for x86-64-v3 (AVX2, no AVX-512): an AVX-512 machine's run checks the portable
    paths too."""
    if platform.machine() != "x86_64":
        pytest.skip("x86-64-v3 is an x86-64 target")
    if not cpu_kernels.available():
        pytest.skip("no C compiler on this machine")
    env = {**os.environ, cpu_kernels.MARCH_ENV: "x86-64-v3"}
    probe = subprocess.run(
        [sys.executable, "-c", "from pagedserve.kernels import cpu_kernels as k; "
         "print(k._loaded_library().int8_linear_simd(), k.bf16_linear_supported())"],
        env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.split()[-2:] == ["0", "False"], probe.stdout  # the portable paths
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow", *KERNEL_TESTS], env=env, cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
