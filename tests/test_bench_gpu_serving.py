"""benchmarks/bench_gpu_serving.py (issue 23's device script) on tiny shapes on the CPU
(--smoke, the graphs through the stand-in capture), so that the script keeps working between
the sessions that have a GPU."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu_serving.py"


def smoke(tmp_path, sections: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path),
                           "--only", sections], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp_path / "results.json").read_text())


def test_smoke_steps_greedy_and_syncs(tmp_path):
    results = smoke(tmp_path, "info,steps,greedy,syncs,quantized")
    assert results["info"]["torch"]
    rows = results["steps"]["models"]["tiny"]["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for row in rows:
        assert row["bound_ms"] > 0
        assert all(row[mode]["step_ms"] > 0 for mode in ("graphs", "eager"))
    greedy = results["greedy"]
    assert greedy["passed"] and greedy["float32"]["equal"]
    # The decode batches shrink from 11 sequences to 1: every captured size replays.
    assert all(count > 0 for count in greedy["float32"]["replays"].values())
    assert "skipped" in results["syncs"]  # CUDA only
    assert results["quantized"]["method"] == "int8"  # fp8 on a GPU
    assert [r["batch"] for r in results["quantized"]["rows"]] == [1, 3]


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    results = smoke(tmp_path, "e2e,peer")
    runs = results["e2e"]["tiny"]
    assert runs["throughput graphs"]["output_throughput"] > 0
    assert runs["throughput eager"]["enforce_eager"] is True
    assert runs["serve graphs"]["failed"] == 0 and runs["serve graphs"]["completed"] == 4
