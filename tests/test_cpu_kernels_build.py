"""The CPU kernels' tests skip where the machine has no C compiler; this one makes sure that a
machine with one builds them, so that a compile error in csrc/ fails the suite instead of
skipping every kernel test (the engine itself falls back to the PyTorch path, with a warning)."""

import os
import shutil

import pytest

from pagedserve.kernels import cpu_kernels


def test_the_kernels_build_wherever_there_is_a_c_compiler():
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert cpu_kernels.available()
