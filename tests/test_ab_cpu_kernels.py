"""benchmarks/ab_cpu_kernels.py on small shapes and one round: a revision's kernels (HEAD,
from git) against the working tree's, each case's outputs checked to agree before timing."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from pagedserve.kernels import cpu_kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ab_cpu_kernels.py"

pytestmark = [
    pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: no CPU kernels"),
    pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                      capture_output=True).returncode != 0,
                       reason="not a git checkout"),
]


def ab(tmp_path, *args: str) -> tuple[list[tuple[str, ...]], dict]:
    out = tmp_path / "ab.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", "HEAD", "--rounds", "1",
                           "--json", str(out), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ":".join(
                              str(ROOT / p) for p in (".", "proto", "gateway", "scheduler_svc",
                                                      "executor_svc", "kernels", "benchmarks"))})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = re.findall(r"^(.+?)\s+base\s+([\d.]+) ms  head\s+([\d.]+) ms  head/base ([\d.]+)$",
                       done.stdout, re.MULTILINE)
    return lines, json.loads(out.read_text())


def test_grouped_formats_in_their_bits_and_a_byte_each(tmp_path):
    lines, figures = ab(tmp_path, "grouped", "--formats", "Q4_1", "Q6_K", "--rows", "1", "5",
                        "--layers", "2", "--shape", "32", "64", "--int16-activations")
    assert [line[0] for line in lines] == [
        f"{fmt} in {bits} bits, {rows} rows, 2 layers"
        for fmt, bits in (("Q4_1", 4), ("Q4_1", 8), ("Q6_K", 6), ("Q6_K", 8)) for rows in (1, 5)]
    assert all(float(base) > 0 and float(head) > 0 for _, base, head, _ in lines)
    assert figures["base"] == "HEAD" and figures["head"] == "working tree"
    assert set(figures["ms_a_pass"]) == {line[0] for line in lines}


@pytest.mark.skipif(not cpu_kernels.float_linear_supported(),
                    reason="AVX-512 CPU: no float_linear")
def test_float_weights_in_each_storage(tmp_path):
    lines, _ = ab(tmp_path, "float", "--rows", "1", "5", "--layers", "2", "--shape", "32", "64")
    assert [line[0] for line in lines] == [f"{storage} weights, {rows} rows, 2 layers"
                                           for storage in ("float32", "bfloat16")
                                           for rows in (1, 5)]


def test_decode_attention_by_cache_dtype(tmp_path):
    lines, _ = ab(tmp_path, "decode-attention", "--batch", "2", "--context", "40", "--layers",
                  "1", "--kv-cache-dtype", "auto", "fp8_e5m2")
    assert [line[0] for line in lines] == ["kv auto, float32 queries, batch 2, ~40",
                                           "kv fp8_e5m2, float32 queries, batch 2, ~40"]


def test_builds_whose_outputs_differ_are_not_timed(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_cpu_kernels

    library = cpu_kernels.open_library(cpu_kernels.build_library())
    calls = iter(range(10))

    def run():  # a different output on each call, as two builds that disagree give
        return torch.full((2,), float(next(calls)))
    with pytest.raises(AssertionError):
        ab_cpu_kernels.alternated({"base": library, "head": library}, {"case": run}, rounds=1)
    assert next(calls) == 2  # checked after one call each, before any timed round
