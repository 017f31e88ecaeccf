"""Benchmark arithmetic, with the definitions `vllm bench serve` uses so that figures compare:

- TTFT: from sending a request to the first chunk that carries output;
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1): the mean time per token after the
  first (requests of one output token have none);
- ITL: the gaps between successive output chunks, pooled over all requests;
- E2EL: from sending a request to its last byte;
- throughput: completed requests, output tokens and prompt + output tokens per second of the
  whole run (first send to last completion).

Pure functions of recorded timestamps, no I/O, so the tests check them against hand-computed
timelines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

PERCENTILE = 99


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds on one monotonic clock."""

    start: float
    end: float = math.nan
    # Arrival time of every chunk that carried output (text or token ids).
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    # Where output_tokens came from: "usage" (the server's count), "token_ids" (ids streamed,
    # gRPC) or "chunks" (one token per chunk assumed).
    token_source: str = "chunks"
    requested_output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in pairwise(self.chunk_times)]


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """Mean, median and p99 of latencies, in milliseconds (0 when there were none)."""

    mean_ms: float = 0.0
    median_ms: float = 0.0
    p99_ms: float = 0.0

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if not seconds:
            return cls()
        return cls(mean_ms=1000 * sum(seconds) / len(seconds),
                   median_ms=1000 * percentile(seconds, 50),
                   p99_ms=1000 * percentile(seconds, PERCENTILE))


@dataclass(frozen=True)
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    peak_concurrency: int
    output_tokens_from: str
    # Completed requests whose output length differs from the one asked for (expected to be 0
    # with --ignore-eos; a server that ignores ignore_eos shows here).
    output_len_mismatches: int

    def to_dict(self) -> dict:
        """Flat, with vLLM's key names (mean_ttft_ms, p99_itl_ms, ...)."""
        flat = {}
        for key, value in asdict(self).items():
            if isinstance(getattr(self, key), LatencyStats):
                flat |= {f"{stat.removesuffix('_ms')}_{key}_ms": v for stat, v in value.items()}
            else:
                flat[key] = value
        return flat


def peak_concurrency(intervals: Sequence[tuple[float, float]]) -> int:
    """Most intervals (start, end) open at one instant; one ending when another starts does
    not overlap it."""
    events = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def token_source(records: Sequence[RequestRecord]) -> str:
    """How the output tokens of these requests were counted ("usage", "chunks", ...)."""
    sources = sorted({r.token_source for r in records})
    if not sources:
        return "none"
    return sources[0] if len(sources) == 1 else "mixed: " + ", ".join(sources)


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> BenchMetrics:
    """Metrics of one run; failed requests count only as failures (and for concurrency)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    done = [r for r in records if r.error is None]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    return BenchMetrics(
        completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft=LatencyStats.of([r.ttft for r in done if r.ttft is not None]),
        tpot=LatencyStats.of([r.tpot for r in done if r.tpot is not None]),
        itl=LatencyStats.of([gap for r in done for gap in r.itls]),
        e2el=LatencyStats.of([r.e2el for r in done]),
        peak_concurrency=peak_concurrency([(r.start, r.end) for r in records]),
        output_tokens_from=token_source(done),
        output_len_mismatches=sum(r.output_tokens != r.requested_output_tokens for r in done))
