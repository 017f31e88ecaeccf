"""`pagedserve bench serve`: stream a workload to a running server and measure it.

Backends: `openai` (POST /v1/completions), `openai-chat` (POST /v1/chat/completions), both of
any OpenAI-compatible server (pagedserve, vLLM, llama.cpp's llama-server), and `grpc`
(pagedserve.v1.Generation/Generate). Every request streams, so the first token and the gaps
between chunks can be timed. Requests arrive all at once (rate inf) or as a Poisson process,
with at most --max-concurrency in flight; a request's clock starts when it is sent, so time a
request waits in this client is in no latency (as in `vllm bench serve`).

Output tokens come from the server's own count when it gives one (`usage` with
stream_options.include_usage; the gRPC API's usage), else from streamed token ids (gRPC), else
one token per chunk (which undercounts if a server packs several tokens into a chunk); the
result says which (`output_tokens_from`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import structlog

from pagedserve.bench.datasets import BenchRequest, warmup_requests
from pagedserve.bench.metrics import BenchMetrics, RequestRecord, compute_metrics

log = structlog.get_logger("pagedserve.bench")

BACKENDS = ("openai", "openai-chat", "grpc")
DEFAULT_ENDPOINTS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
DEFAULT_BASE_URLS = {"openai": "http://127.0.0.1:8000", "openai-chat": "http://127.0.0.1:8000",
                     "grpc": "127.0.0.1:50051"}
ERRORS_KEPT = 5


class BenchError(RuntimeError):
    """The benchmark cannot run (bad target, warm-up failed); one line for the user."""


class RequestFailed(RuntimeError):
    """One request failed (HTTP status, error event, RPC error); counted, not fatal."""


@dataclass(frozen=True)
class ServeConfig:
    backend: str
    base_url: str
    endpoint: str
    model: str | None = None
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    # Merged into every OpenAI request body, e.g. {"min_tokens": 128} for llama-cpp-python.
    extra_body: dict = field(default_factory=dict)
    api_key: str | None = None
    request_timeout_s: float = 3600.0
    seed: int = 0
    num_warmups: int = 1
    show_progress: bool = True


@dataclass(frozen=True)
class ServeResult:
    config: ServeConfig
    request_rate: float
    model: str
    num_prompts: int
    metrics: BenchMetrics
    errors: list[str]

    def to_dict(self) -> dict:
        return {**asdict(self.config), "request_rate": _rate_text(self.request_rate),
                "model": self.model, "num_prompts": self.num_prompts,
                **self.metrics.to_dict(), "errors": self.errors}


class Backend(Protocol):
    model: str

    async def send(self, request: BenchRequest, max_tokens: int, record: RequestRecord) -> None:
        """Send one request and fill `record` as its stream arrives; raise on failure."""

    async def close(self) -> None: ...


def _rate_text(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# --- OpenAI-compatible HTTP ------------------------------------------------------------------

# Idle connections are closed by the client before the server would close them (uvicorn, which
# serves both pagedserve's gateway and vLLM, closes them after 5 s; aiohttp keeps them 15 s).
# Otherwise a request sent on a connection just as the server closes it fails with "Server
# disconnected": seen once in 128 Poisson requests against `vllm serve`.
KEEPALIVE_TIMEOUT_S = 2.0


class OpenAIBackend:
    """Streams /v1/completions or /v1/chat/completions over one aiohttp session whose
    connection pool is at least as large as the concurrency."""

    def __init__(self, config: ServeConfig, session, model: str):
        self.config, self.session, self.model = config, session, model
        self.url = config.base_url.rstrip("/") + config.endpoint
        self.chat = config.backend == "openai-chat"

    @classmethod
    async def open(cls, config: ServeConfig, connections: int) -> OpenAIBackend:
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections,
                                           keepalive_timeout=KEEPALIVE_TIMEOUT_S),
            timeout=aiohttp.ClientTimeout(total=config.request_timeout_s),
            headers=_auth(config.api_key))
        try:
            model = config.model or await cls._first_model(session, config.base_url)
        except BaseException:
            await session.close()
            raise
        return cls(config, session, model)

    @staticmethod
    async def _first_model(session, base_url: str) -> str:
        url = base_url.rstrip("/") + "/v1/models"
        try:
            async with session.get(url) as response:
                response.raise_for_status()
                return (await response.json())["data"][0]["id"]
        except Exception as exc:
            raise BenchError(f"could not read the model name from GET {url} ({exc}); "
                             "pass --model") from None

    def body(self, request: BenchRequest, max_tokens: int) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens,
                "temperature": self.config.temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = (list(request.prompt_token_ids) if request.prompt_token_ids
                              else request.prompt)
        if self.config.ignore_eos:
            body["ignore_eos"] = True
        return body | self.config.extra_body

    async def send(self, request: BenchRequest, max_tokens: int, record: RequestRecord) -> None:
        chunks, usage = 0, None
        async with self.session.post(self.url, json=self.body(request, max_tokens)) as response:
            if response.status != 200:
                raise RequestFailed(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RequestFailed(f"error event: {event['error']}")
                usage = event.get("usage") or usage
                if any(self._content(choice) for choice in event.get("choices") or ()):
                    record.chunk_times.append(time.perf_counter())
                    chunks += 1
        _count_tokens(record, request, usage, chunks)

    def _content(self, choice: dict) -> str | None:
        return (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")

    async def close(self) -> None:
        await self.session.close()


def _count_tokens(record: RequestRecord, request: BenchRequest, usage: dict | None,
                  chunks: int) -> None:
    if usage and usage.get("completion_tokens") is not None:
        record.output_tokens, record.token_source = usage["completion_tokens"], "usage"
        record.prompt_tokens = usage.get("prompt_tokens") or request.prompt_len or 0
    else:
        record.output_tokens, record.token_source = chunks, "chunks"
        record.prompt_tokens = request.prompt_len or 0


# --- pagedserve gRPC -------------------------------------------------------------------------

class GrpcBackend:
    """Streams pagedserve.v1.Generation/Generate on one channel (HTTP/2 multiplexes every
    request on it)."""

    def __init__(self, config: ServeConfig):
        import grpc

        from pagedserve.v1 import generation_pb2_grpc

        self.config, self.model = config, config.model or ""
        # "grpc://host:port", "http://host:port" and "host:port" all name the same target.
        self.target = config.base_url.split("://", 1)[-1].rstrip("/")
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = tuple((k.lower(), v) for k, v in _auth(config.api_key).items())

    @classmethod
    async def open(cls, config: ServeConfig) -> GrpcBackend:
        """Connect and learn the served model's name (ListModels) for the result."""
        import grpc

        from pagedserve.v1 import generation_pb2

        backend = cls(config)
        try:
            models = await backend.stub.ListModels(generation_pb2.ListModelsRequest(),
                                                   metadata=backend.metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            await backend.close()
            raise BenchError(f"ListModels at {backend.target} failed: {exc.code().name} "
                             f"{exc.details()}") from None
        if not backend.model and models.models:
            backend.model = models.models[0].model_id
        return backend

    def generate_request(self, request: BenchRequest, max_tokens: int):
        from pagedserve.v1 import common_pb2, generation_pb2

        sampling = common_pb2.SamplingParams(max_tokens=max_tokens,
                                             temperature=self.config.temperature,
                                             ignore_eos=self.config.ignore_eos)
        if request.prompt_token_ids:
            return generation_pb2.GenerateRequest(
                model=self.model, sampling=sampling,
                token_ids=common_pb2.TokenIds(ids=request.prompt_token_ids))
        return generation_pb2.GenerateRequest(model=self.model, sampling=sampling,
                                              text=request.prompt)

    async def send(self, request: BenchRequest, max_tokens: int, record: RequestRecord) -> None:
        import grpc

        ids, usage = 0, None
        call = self.stub.Generate(self.generate_request(request, max_tokens),
                                  metadata=self.metadata, timeout=self.config.request_timeout_s)
        try:
            async for response in call:
                new = sum(len(choice.token_ids) for choice in response.choices)
                if new:
                    record.chunk_times.append(time.perf_counter())
                    ids += new
                if response.HasField("usage"):
                    usage = response.usage
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(f"{exc.code().name}: {exc.details()}") from None
        if usage is not None:
            record.output_tokens, record.token_source = usage.completion_tokens, "usage"
            record.prompt_tokens = usage.prompt_tokens
        else:
            record.output_tokens, record.token_source = ids, "token_ids"
            record.prompt_tokens = request.prompt_len or 0

    async def close(self) -> None:
        await self.channel.close()


async def open_backend(config: ServeConfig, connections: int) -> Backend:
    """The backend of config.backend; `connections` sizes the HTTP connection pool."""
    if config.backend == "grpc":
        return await GrpcBackend.open(config)
    return await OpenAIBackend.open(config, connections)


# --- running ---------------------------------------------------------------------------------

def check_requests(config: ServeConfig, requests: Sequence[BenchRequest]) -> None:
    """Refuse up front what the backend cannot send (rather than fail every request)."""
    if config.backend == "openai-chat" and any(not r.prompt for r in requests):
        raise BenchError("--backend openai-chat needs text prompts: use --dataset jsonl with "
                         "a 'prompt' field on every line")


async def send_one(backend: Backend, request: BenchRequest, max_tokens: int) -> RequestRecord:
    """One request; a failure is recorded in the result, not raised."""
    record = RequestRecord(start=time.perf_counter(), requested_output_tokens=max_tokens)
    try:
        await backend.send(request, max_tokens, record)
    except Exception as exc:  # a load generator counts every kind of failure and goes on
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        record.end = time.perf_counter()
    return record


async def warm_up(backend: Backend, requests: Sequence[BenchRequest], count: int) -> None:
    """A few short requests, sent together, before the clock starts (a fresh server's first
    batches are slow); the first failure stops the benchmark (a wrong URL or model should give
    one clear error, not N failed requests)."""
    records = await asyncio.gather(*(send_one(backend, request, request.output_len)
                                     for request in warmup_requests(requests, count)))
    errors = [record.error for record in records if record.error is not None]
    if errors:
        raise BenchError(f"warm-up request failed: {errors[0]}")


def arrival_gaps(count: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before sending each request: none at rate inf; otherwise a Poisson
    process (exponential gaps of mean 1/rate), the first request sent at once."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(rate) for _ in range(count - 1)]


async def run_requests(backend: Backend, requests: Sequence[BenchRequest], rate: float,
                       config: ServeConfig) -> tuple[list[RequestRecord], float]:
    """Send every request at its arrival time (at most max_concurrency in flight): the
    records and the run's duration (first send to last completion)."""
    from tqdm.auto import tqdm

    limit = asyncio.Semaphore(config.max_concurrency or len(requests))
    progress = tqdm(total=len(requests), disable=not config.show_progress, unit="req",
                    desc=f"rate {_rate_text(rate)}")

    async def limited(request: BenchRequest) -> RequestRecord:
        async with limit:
            record = await send_one(backend, request, request.output_len)
        progress.update(1)
        return record

    start = time.perf_counter()
    tasks = []
    for request, gap in zip(requests, arrival_gaps(len(requests), rate, config.seed),
                            strict=True):
        await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(limited(request)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return records, duration


async def benchmark(config: ServeConfig, requests: Sequence[BenchRequest],
                    rates: Sequence[float]) -> list[ServeResult]:
    """Warm up once, then run the whole workload at each rate in turn."""
    check_requests(config, requests)
    backend = await open_backend(config, config.max_concurrency or len(requests))
    try:
        await warm_up(backend, requests, config.num_warmups)
        results = []
        for rate in rates:
            log.info("bench serve: running", request_rate=_rate_text(rate),
                     num_prompts=len(requests), max_concurrency=config.max_concurrency)
            records, duration = await run_requests(backend, requests, rate, config)
            errors = [r.error for r in records if r.error is not None][:ERRORS_KEPT]
            results.append(ServeResult(
                config=config, request_rate=rate, model=backend.model, num_prompts=len(requests),
                metrics=compute_metrics(records, duration), errors=errors))
        return results
    finally:
        await backend.close()


def run(config: ServeConfig, requests: Sequence[BenchRequest],
        rates: Sequence[float]) -> list[ServeResult]:
    return asyncio.run(benchmark(config, requests, rates))


# --- reporting -------------------------------------------------------------------------------

def format_result(result: ServeResult) -> str:
    """A block in `vllm bench serve`'s layout."""
    m, c = result.metrics, result.config
    target = c.base_url + ("" if c.backend == "grpc" else c.endpoint)
    rows = [("Backend", c.backend), ("Target", target), ("Model", result.model),
            ("Request rate (req/s)", _rate_text(result.request_rate)),
            ("Max concurrency", c.max_concurrency or "unlimited"),
            ("Successful requests", m.completed), ("Failed requests", m.failed),
            ("Benchmark duration (s)", f"{m.duration_s:.2f}"),
            ("Total input tokens", m.total_input_tokens),
            ("Total generated tokens", m.total_output_tokens),
            ("Output tokens counted from", m.output_tokens_from),
            ("Output length mismatches", m.output_len_mismatches),
            ("Request throughput (req/s)", f"{m.request_throughput:.2f}"),
            ("Output token throughput (tok/s)", f"{m.output_throughput:.2f}"),
            ("Total token throughput (tok/s)", f"{m.total_token_throughput:.2f}"),
            ("Peak concurrent requests", m.peak_concurrency)]
    lines = [" Serving Benchmark Result ".center(50, "="),
             *(f"{name + ':':<40}{value!s:>10}" for name, value in rows)]
    for title, key, stats in (("Time to First Token", "TTFT", m.ttft),
                              ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
                              ("Inter-token Latency", "ITL", m.itl),
                              ("End-to-end Latency", "E2EL", m.e2el)):
        lines += [f" {title} ".center(50, "-"),
                  *(f"{f'{label} {key} (ms):':<40}{value:>10.2f}" for label, value in
                    (("Mean", stats.mean_ms), ("Median", stats.median_ms),
                     ("P99", stats.p99_ms)))]
    lines += ["=" * 50, *(f"error: {e}" for e in result.errors)]
    return "\n".join(lines)


def plot_sweep(results: Sequence[ServeResult], path) -> None:
    """Throughput against latency, one point per request rate: where more load stops buying
    throughput and only adds latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [r.metrics.output_throughput for r in results]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (name, pick) in zip(axes, (("TTFT", lambda m: m.ttft), ("TPOT", lambda m: m.tpot),
                                         ("E2EL", lambda m: m.e2el)), strict=True):
        for stat in ("mean_ms", "p99_ms"):
            axis.plot(throughput, [getattr(pick(r.metrics), stat) for r in results], marker="o",
                      label=stat.removesuffix("_ms"))
        for r, x in zip(results, throughput, strict=True):
            axis.annotate(f"{_rate_text(r.request_rate)}/s",
                          (x, pick(r.metrics).mean_ms), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
        axis.set(xlabel="output throughput (tok/s)", ylabel=f"{name} (ms)", title=name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{results[0].config.backend} {results[0].config.base_url} "
                    f"({results[0].model}): throughput vs latency by request rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
