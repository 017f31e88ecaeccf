"""`pagedserve bench`: the metric arithmetic on hand-built timelines, the datasets, `bench serve`
end to end against fake OpenAI and gRPC servers whose timelines are known, and `bench
throughput` on the tiny random-weight model."""

import asyncio
import json
import math
import pathlib
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from aiohttp import web

from pagedserve.bench import datasets, metrics
from pagedserve.bench.cli import load_requests
from pagedserve.entrypoints.cli import build_parser
from pagedserve.entrypoints.cli import main as pagedserve_main
from pagedserve.runtime.serving import free_ports
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

# --- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [0.1, 7.0, 2.5, 2.5, 9.0, 4.25, 0.0]])
def test_percentile_matches_numpy(values, p):
    assert metrics.percentile(values, p) == pytest.approx(np.percentile(values, p))


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        metrics.percentile([], 50)


def record(start, chunks, end, tokens, requested=None, error=None, source="usage"):
    return metrics.RequestRecord(start=start, end=end, chunk_times=list(chunks),
                                 prompt_tokens=10, output_tokens=tokens, token_source=source,
                                 requested_output_tokens=tokens if requested is None
                                 else requested, error=error)


def test_per_request_latencies_on_a_timeline():
    # Sent at 1.0; chunks at 1.5, 1.7, 2.0, 2.1; last byte at 2.2; 4 tokens.
    r = record(1.0, [1.5, 1.7, 2.0, 2.1], 2.2, 4)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2el == pytest.approx(1.2)
    assert r.tpot == pytest.approx((1.2 - 0.5) / 3)
    assert r.itls == pytest.approx([0.2, 0.3, 0.1])
    assert record(0.0, [0.3], 0.4, 1).tpot is None  # one token: no time per output token
    assert record(0.0, [], 0.4, 0).ttft is None


def test_run_metrics_on_a_timeline():
    records = [record(0.0, [0.5, 0.7, 1.0], 1.0, 3),
               record(0.2, [0.4, 1.2], 1.4, 2, requested=5),
               record(0.5, [], 0.6, 0, error="HTTP 500")]
    m = metrics.compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (20, 5)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(2.5)
    assert m.total_token_throughput == pytest.approx(12.5)
    assert m.ttft.mean_ms == pytest.approx(350)  # 0.5 and 0.2
    assert m.ttft.median_ms == pytest.approx(350)
    assert m.ttft.p99_ms == pytest.approx(1000 * np.percentile([0.5, 0.2], 99))
    # TPOT: (1.0 - 0.5) / 2 = 0.25 and (1.2 - 0.2) / 1 = 1.0
    assert m.tpot.mean_ms == pytest.approx(625)
    # ITL pooled: 0.2, 0.3 (first request), 0.8 (second)
    assert m.itl.mean_ms == pytest.approx(1000 * (0.2 + 0.3 + 0.8) / 3)
    assert m.itl.median_ms == pytest.approx(300)
    assert m.e2el.mean_ms == pytest.approx(1100)
    assert m.peak_concurrency == 3  # all three open at 0.5-0.6
    assert m.output_len_mismatches == 1
    assert m.output_tokens_from == "usage"
    flat = m.to_dict()
    assert flat["p99_itl_ms"] == pytest.approx(m.itl.p99_ms)
    assert flat["mean_e2el_ms"] == pytest.approx(1100) and "e2el" not in flat


def test_peak_concurrency_does_not_count_touching_intervals():
    assert metrics.peak_concurrency([(0, 1), (1, 2), (2, 3)]) == 1
    assert metrics.peak_concurrency([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3
    assert metrics.peak_concurrency([]) == 0


def test_token_source_names_a_mixture():
    assert metrics.token_source([record(0, [1], 1, 1, source="chunks")]) == "chunks"
    assert metrics.token_source([record(0, [1], 1, 1), record(0, [1], 1, 1, source="chunks")]) \
        == "mixed: chunks, usage"


# --- datasets -------------------------------------------------------------------------------


def test_random_lengths_stay_in_range_and_the_seed_decides():
    bounds = datasets.length_range(100, 0.25)
    assert bounds == (75, 125)
    requests = datasets.random_requests(200, bounds, (4, 8), vocab_size=50, seed=7)
    assert len(requests) == 200
    assert all(75 <= r.prompt_len <= 125 and 4 <= r.output_len <= 8 for r in requests)
    assert all(0 <= i < 50 for r in requests for i in r.prompt_token_ids)
    lengths = {r.prompt_len for r in requests}
    assert min(lengths) < 85 and max(lengths) > 115  # spread over the range, not a constant
    assert requests == datasets.random_requests(200, bounds, (4, 8), vocab_size=50, seed=7)
    assert requests != datasets.random_requests(200, bounds, (4, 8), vocab_size=50, seed=8)
    assert datasets.length_range(100, 0.0) == (100, 100)
    with pytest.raises(datasets.DatasetError, match="range-ratio"):
        datasets.length_range(100, 1.5)


def test_jsonl_reads_the_peers_format(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"id":0,"prompt":"Hi there","prompt_token_ids":[5,6],"prompt_len":2,'
                    '"max_tokens":33}\n\n{"prompt":"text only","output_len":4}\n'
                    '{"prompt_token_ids":[1,2,3],"max_tokens":2}\n')
    requests = datasets.load_jsonl(path)
    assert requests == [
        datasets.BenchRequest(prompt_token_ids=(5, 6), prompt="Hi there", output_len=33),
        datasets.BenchRequest(prompt_token_ids=None, prompt="text only", output_len=4),
        datasets.BenchRequest(prompt_token_ids=(1, 2, 3), prompt=None, output_len=2)]
    assert datasets.load_jsonl(path, num_prompts=2) == requests[:2]
    with pytest.raises(datasets.DatasetError, match="only 3 requests"):
        datasets.load_jsonl(path, num_prompts=4)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x"', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    ('{"max_tokens": 3}', "line 2: needs a non-empty 'prompt' or 'prompt_token_ids'"),
    ('{"prompt": "x"}', "line 2: needs an output length: field 'max_tokens'"),
    ('{"prompt": "x", "max_tokens": 0}', "line 2: field 'max_tokens' must be a positive"),
    ('{"prompt": "x", "output_len": "5"}', "line 2: field 'output_len' must be a positive"),
    ('{"prompt_token_ids": [1, -2], "max_tokens": 1}', "line 2: field 'prompt_token_ids'"),
    ('{"prompt_token_ids": "1 2", "max_tokens": 1}', "line 2: field 'prompt_token_ids'"),
    ('{"prompt": 5, "max_tokens": 1}', "line 2: field 'prompt' must be a string"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine", "max_tokens": 1}\n' + line + "\n")
    with pytest.raises(datasets.DatasetError) as error:
        datasets.load_jsonl(path)
    assert str(error.value).startswith(f"{path}, line 2: ")
    assert message in str(error.value)


def test_warmup_prompts_are_not_prefixes_of_the_workload():
    workload = [datasets.BenchRequest((1, 2, 3), "abc", 9)]
    assert datasets.warmup_requests(workload, 2) == [datasets.BenchRequest((3, 2, 1), "cba", 4)] * 2


def test_the_cli_builds_the_workload_its_flags_describe(tmp_path):
    args = build_parser().parse_args(["bench", "serve", "--num-prompts", "5", "--input-len", "20",
                                      "--output-len", "6", "--range-ratio", "0.5", "--seed", "3"])
    requests = load_requests(args, vocab_size=1000)
    assert requests == datasets.random_requests(5, (10, 30), (3, 9), 1000, 3)
    args = build_parser().parse_args(["bench", "serve", "--dataset", "jsonl"])
    with pytest.raises(datasets.DatasetError, match="--dataset-path"):
        load_requests(args, vocab_size=1000)


@pytest.mark.parametrize("benchmark", ["serve", "throughput"])
def test_every_bench_flag_is_documented_with_its_variable(benchmark):
    executable = pathlib.Path(sys.executable).with_name("pagedserve")
    result = subprocess.run([str(executable), "bench", benchmark, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]*)", result.stdout, re.MULTILINE)) - {"--help"}
    assert {"--dataset", "--num-prompts", "--seed", "--ignore-eos", "--result-json"} <= flags
    if benchmark == "serve":
        assert {"--base-url", "--endpoint", "--request-rate", "--max-concurrency",
                "--sweep-rates", "--backend"} <= flags
    else:
        assert {"--model", "--dtype", "--kv-cache-gib", "--max-num-seqs"} <= flags
    for flag in flags:
        assert f"PAGEDSERVE_{flag[2:].replace('-', '_').upper()}" in result.stdout, flag


# --- bench serve against fake servers ---------------------------------------------------------

TTFT_S = 0.08  # the fake waits this long before its first chunk
ITL_S = 0.03   # and this long between chunks


class FakeOpenAIServer:
    """Streams `max_tokens` chunks of one word each on a known timeline: the first after TTFT_S,
    each next one ITL_S later; the usage chunk when asked for (and `send_usage`). A prompt
    "fail" gets HTTP 500, "fail midway" an error event after its first chunk. Records the
    request bodies and the most requests it had open."""

    def __init__(self, send_usage: bool = True):
        self.send_usage = send_usage
        self.bodies: list[dict] = []
        self.open = self.peak_open = 0
        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body["prompt"] == "fail":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            return await self._stream(request, body)
        finally:
            self.open -= 1

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
            await self._event(response, {"choices": [{"index": 0, "text": f" w{i}",
                                                      "finish_reason": None}]})
            if body["prompt"] == "fail midway":  # as pagedserve's gateway reports a late error
                await self._event(response, {"error": {"message": "lost", "code": 503}})
                break
        if self.send_usage and body.get("stream_options", {}).get("include_usage"):
            await self._event(response, {"choices": [], "usage": {
                "prompt_tokens": 7, "completion_tokens": body["max_tokens"],
                "total_tokens": 7 + body["max_tokens"]}})
        await response.write(b"data: [DONE]\n\n")
        return response

    @staticmethod
    async def _event(response: web.StreamResponse, event: dict) -> None:
        await response.write(f"data: {json.dumps(event)}\n\n".encode())

    def __enter__(self):
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self._runner = web.AppRunner(app)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def write_workload(path: pathlib.Path, prompts_and_lengths) -> pathlib.Path:
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": n}) + "\n"
                            for p, n in prompts_and_lengths))
    return path


def bench_serve(*flags: str) -> int:
    return pagedserve_main(["bench", "serve", "--disable-tqdm", "--log-level", "warning",
                            *flags])


def test_serve_reports_the_fake_servers_timeline(tmp_path, capsys):
    lengths = [4, 6, 8, 5]
    workload = write_workload(tmp_path / "w.jsonl", [(f"p{i}", n) for i, n in enumerate(lengths)])
    result_file = tmp_path / "result.json"
    with FakeOpenAIServer() as server:
        status = bench_serve("--base-url", server.url, "--dataset", "jsonl", "--dataset-path",
                             str(workload), "--ignore-eos", "--num-warmups", "1",
                             "--result-json", str(result_file))
    assert status == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    result = json.loads(result_file.read_text())
    # The warm-up (reversed prompt, 4 tokens) went first, then the workload.
    assert server.bodies[0]["prompt"] == "0p" and server.bodies[0]["max_tokens"] == 4
    sent = server.bodies[1:]
    assert [b["max_tokens"] for b in sent] == lengths
    assert all(b["ignore_eos"] and b["stream"] and b["stream_options"]["include_usage"]
               and b["model"] == "fake-model" and b["temperature"] == 0 for b in sent)

    assert result["model"] == "fake-model" and result["request_rate"] == "inf"
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["total_output_tokens"] == sum(lengths)
    assert result["total_input_tokens"] == 4 * 7  # from usage
    assert result["output_tokens_from"] == "usage"
    assert result["output_len_mismatches"] == 0
    assert result["peak_concurrency"] == 4 == server.peak_open  # rate inf, no limit
    # The fake's timeline, from below exactly and from above within a loose tolerance (a busy
    # 2-core machine may be late, never early).
    slack = 0.15
    assert TTFT_S <= result["mean_ttft_ms"] / 1000 <= TTFT_S + slack
    assert ITL_S <= result["median_itl_ms"] / 1000 <= ITL_S + slack
    assert ITL_S * 0.9 <= result["mean_tpot_ms"] / 1000 <= ITL_S + slack
    longest = TTFT_S + (max(lengths) - 1) * ITL_S
    assert longest <= result["p99_e2el_ms"] / 1000 <= longest + slack
    assert longest <= result["duration_s"] <= longest + 2 * slack
    assert result["output_throughput"] == pytest.approx(sum(lengths) / result["duration_s"])
    assert result["request_throughput"] == pytest.approx(4 / result["duration_s"])
    assert result["total_token_throughput"] == pytest.approx((sum(lengths) + 28)
                                                             / result["duration_s"])
    assert result["dataset"] == "jsonl" and result["num_prompts"] == 4


def test_serve_counts_chunks_without_usage_and_honours_max_concurrency(tmp_path):
    workload = write_workload(tmp_path / "w.jsonl", [(f"p{i}", 3) for i in range(6)])
    result_file = tmp_path / "result.json"
    with FakeOpenAIServer(send_usage=False) as server:
        status = bench_serve("--base-url", server.url, "--dataset", "jsonl", "--dataset-path",
                             str(workload), "--max-concurrency", "2", "--num-warmups", "0",
                             "--model", "named", "--result-json", str(result_file))
    assert status == 0
    result = json.loads(result_file.read_text())
    assert result["output_tokens_from"] == "chunks"
    assert result["total_output_tokens"] == 18
    assert result["peak_concurrency"] == 2 == server.peak_open
    assert all(b["model"] == "named" and "ignore_eos" not in b for b in server.bodies)
    # Three waves of two requests, each TTFT_S + 2 * ITL_S long.
    assert result["duration_s"] >= 3 * (TTFT_S + 2 * ITL_S)


def test_the_client_drops_idle_connections_before_uvicorn_would():
    """pagedserve's gateway and `vllm serve` are both uvicorn servers: a request sent on an
    idle connection just as the server closes it fails with "Server disconnected"."""
    import uvicorn

    from pagedserve.bench.serve import KEEPALIVE_TIMEOUT_S

    assert 0 < KEEPALIVE_TIMEOUT_S < uvicorn.Config(app=None).timeout_keep_alive


def test_serve_counts_failed_requests(tmp_path, capsys):
    workload = write_workload(tmp_path / "w.jsonl", [("ok", 2), ("fail", 2), ("ok2", 3),
                                                     ("fail midway", 2)])
    result_file = tmp_path / "result.json"
    with FakeOpenAIServer() as server:
        status = bench_serve("--base-url", server.url, "--dataset", "jsonl", "--dataset-path",
                             str(workload), "--num-warmups", "0", "--result-json",
                             str(result_file))
    assert status == 1  # a request failed
    result = json.loads(result_file.read_text())
    assert (result["completed"], result["failed"]) == (2, 2)
    assert result["total_output_tokens"] == 5
    assert sorted(e.split(":")[1].strip() for e in result["errors"]) == ["HTTP 500",
                                                                          "error event"]
    assert "Failed requests:" in capsys.readouterr().out


def test_a_failed_warm_up_stops_the_benchmark(tmp_path, capsys):
    workload = write_workload(tmp_path / "w.jsonl", [("liaf", 2)])  # warms up with "fail"
    with FakeOpenAIServer() as server:
        status = bench_serve("--base-url", server.url, "--dataset", "jsonl", "--dataset-path",
                             str(workload))
    assert status == 2
    assert "warm-up request failed: RequestFailed: HTTP 500" in capsys.readouterr().err
    assert len(server.bodies) == 1


def test_an_unreachable_server_is_one_clear_error(capsys):
    (port,) = free_ports(1)
    status = bench_serve("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2")
    assert status == 2
    assert "pass --model" in capsys.readouterr().err


def test_sweep_runs_every_rate_and_draws_the_plot(tmp_path):
    plot = tmp_path / "sweep.png"
    result_file = tmp_path / "sweep.json"
    with FakeOpenAIServer() as server:
        status = bench_serve("--base-url", server.url, "--num-prompts", "4", "--input-len", "5",
                             "--output-len", "2", "--num-warmups", "0", "--sweep-rates",
                             "40,inf", "--plot-file", str(plot), "--result-json",
                             str(result_file))
    assert status == 0
    result = json.loads(result_file.read_text())
    assert [run["request_rate"] for run in result["sweep"]] == [40.0, "inf"]
    assert all(run["completed"] == 4 for run in result["sweep"])
    assert len(server.bodies) == 8
    assert all(isinstance(b["prompt"], list) and len(b["prompt"]) == 5 for b in server.bodies)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert result["plot_file"] == str(plot)


def test_poisson_arrivals_have_the_requested_mean_gap():
    from pagedserve.bench.serve import arrival_gaps

    gaps = arrival_gaps(4001, rate=20.0, seed=1)
    assert gaps[0] == 0.0
    assert sum(gaps[1:]) / 4000 == pytest.approx(1 / 20, rel=0.05)
    assert arrival_gaps(3, rate=math.inf, seed=1) == [0.0, 0.0, 0.0]
    assert gaps == arrival_gaps(4001, rate=20.0, seed=1)


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """pagedserve.v1.Generation's Generate on the same timeline as FakeOpenAIServer: one token
    id per message, usage on the last."""

    async def ListModels(self, request, context):
        return generation_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(model_id="fake-grpc")])

    async def Generate(self, request, context):
        n = request.sampling.max_tokens
        for i in range(n):
            await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
            yield generation_pb2.GenerateResponse(
                choices=[generation_pb2.ChoiceDelta(text=f" w{i}", token_ids=[i])],
                usage=common_pb2.Usage(prompt_tokens=len(request.token_ids.ids),
                                       completion_tokens=n) if i == n - 1 else None)


def test_serve_over_grpc(tmp_path):
    import grpc

    (port,) = free_ports(1)
    ready, stop = threading.Event(), threading.Event()

    async def serve():
        server = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(FakeGeneration(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    result_file = tmp_path / "grpc.json"
    try:
        start = time.perf_counter()
        status = bench_serve("--backend", "grpc", "--base-url", f"127.0.0.1:{port}",
                             "--num-prompts", "3", "--input-len", "6", "--output-len", "4",
                             "--result-json", str(result_file))
        assert time.perf_counter() - start < 10
    finally:
        stop.set()
        thread.join(10)
    assert status == 0
    result = json.loads(result_file.read_text())
    assert result["model"] == "fake-grpc"
    assert (result["completed"], result["total_output_tokens"]) == (3, 12)
    assert result["total_input_tokens"] == 18 and result["output_tokens_from"] == "usage"
    assert TTFT_S <= result["mean_ttft_ms"] / 1000 <= TTFT_S + 0.15
    assert ITL_S <= result["median_itl_ms"] / 1000 <= ITL_S + 0.15


def test_chat_backend_refuses_prompts_without_text(capsys):
    status = bench_serve("--backend", "openai-chat", "--num-prompts", "2", "--model", "m")
    assert status == 2
    assert "openai-chat needs text prompts" in capsys.readouterr().err


# --- bench throughput -------------------------------------------------------------------------


def test_throughput_on_the_tiny_model(tiny_llama_dir, tmp_path, capsys):
    result_file = tmp_path / "throughput.json"
    status = pagedserve_main(["bench", "throughput", "--model", str(tiny_llama_dir),
                              "--num-prompts", "3", "--input-len", "12", "--output-len", "5",
                              "--ignore-eos", "--kv-cache-gib", "0.01", "--no-overlap",
                              "--log-level",
                              "warning", "--result-json", str(result_file)])
    assert status == 0
    assert "Offline Throughput Result" in capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert result["total_output_tokens"] == 15 and result["total_input_tokens"] == 36
    assert result["output_len_mismatches"] == 0
    # Without overlap: the 3 prompts prefill in one step (which samples each one's first
    # token), then 4 decode steps of 3 sequences.
    assert (result["steps"], result["sequences"], result["mean_batch_size"]) == (5, 15, 3.0)
    assert result["scheduled_tokens"] == 36 + 3 * 4
    assert result["mean_tokens_per_step"] == pytest.approx(48 / 5)
    assert result["preemptions"] == 0 and result["prefix_hit_rate"] == 0.0
    assert result["output_throughput"] == pytest.approx(15 / result["elapsed_s"])


def test_throughput_counters_cover_only_the_timed_call(tiny_llama_dir):
    from pagedserve.bench.throughput import build_llm, run_offline

    llm = build_llm(str(tiny_llama_dir), {"kv_cache_gib": 0.01})
    workload = [datasets.BenchRequest(tuple(range(1, 41)), None, 3)]
    first = run_offline(llm, workload, ignore_eos=True)
    again = run_offline(llm, workload, ignore_eos=True)
    assert first.counters.prefix_hit_tokens == 0
    assert again.counters.prefix_queried_tokens == 40
    assert again.counters.prefix_hit_tokens == 32  # two full blocks of 16 from the first run
    assert again.to_dict()["prefix_hit_rate"] == pytest.approx(0.8)
