"""Prometheus metrics (prefix `pagedserve_`; names are a stable interface for dashboards).

The gateway measures what clients see (latencies, token and request counts, by finish reason);
the scheduler's state (queue, KV blocks per executor, prefix cache, preemptions) is pulled from
its GetStats at scrape time and exposed here too, so one scrape of the gateway covers both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.v1 import scheduler_pb2

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("pagedserve_prompt_tokens", "Prompt tokens of requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("pagedserve_generation_tokens",
                                         "Generated tokens streamed to clients",
                                         registry=self.registry)
        self.requests_finished = Counter("pagedserve_requests_finished",
                                         "Finished sequences (choices) by finish reason",
                                         ["finish_reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "pagedserve_time_to_first_token_seconds", "Time from arrival to the first token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "pagedserve_inter_token_latency_seconds", "Time between a choice's tokens",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(
            "pagedserve_e2e_request_latency_seconds", "Time from arrival to the last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry)

    def exposition(self, stats: scheduler_pb2.SchedulerStats | None) -> bytes:
        """The gateway's metrics, then the scheduler's (omitted when it did not answer)."""
        text = generate_latest(self.registry)
        if stats is not None:
            snapshot = CollectorRegistry()
            snapshot.register(_SchedulerCollector(stats))
            text += generate_latest(snapshot)
        return text


# Gauges labelled by executor: (name, help, the ExecutorStats field).
_PER_EXECUTOR = [
    ("pagedserve_kv_blocks_total", "KV blocks in the pool", "total_blocks"),
    ("pagedserve_kv_blocks_free", "KV blocks no request holds (cached ones included)",
     "free_blocks"),
    ("pagedserve_kv_blocks_cached_free", "Free KV blocks still in the prefix cache",
     "cached_free_blocks"),
    ("pagedserve_weight_bytes", "Bytes the model's weights take on one rank of the executor",
     "weight_bytes"),
    ("pagedserve_kv_cache_bytes", "Bytes of the KV pool on one rank of the executor",
     "kv_cache_bytes"),
]


class _SchedulerCollector:
    def __init__(self, stats: scheduler_pb2.SchedulerStats):
        self.stats = stats

    def collect(self):
        stats = self.stats
        yield GaugeMetricFamily("pagedserve_requests_running", "Sequences being computed",
                                value=stats.num_running)
        yield GaugeMetricFamily("pagedserve_requests_waiting", "Sequences queued",
                                value=stats.num_waiting)
        per_executor = [(GaugeMetricFamily(name, doc, labels=["executor"]), field)
                        for name, doc, field in _PER_EXECUTOR]
        info = GaugeMetricFamily("pagedserve_executor_info",
                                 "1 per executor, labelled with what sizes its memory",
                                 labels=["executor", "quantization", "kv_cache_dtype"])
        for executor in stats.executors:
            for family, field in per_executor:
                family.add_metric([executor.executor_id], getattr(executor, field))
            info.add_metric([executor.executor_id, executor.quantization or "none",
                             executor.kv_cache_dtype], 1)
        yield from (family for family, _ in per_executor)
        yield info
        for name, doc, value in (
                ("pagedserve_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                 "prefix cache", stats.prefix_cache_queried_tokens),
                ("pagedserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                 stats.prefix_cache_hit_tokens),
                ("pagedserve_preemptions", "Sequences preempted", stats.num_preemptions),
                ("pagedserve_scheduler_steps", "Steps planned", stats.num_steps),
                ("pagedserve_spec_decode_num_drafts", "Decodes planned with speculative "
                 "proposals", stats.spec_decode_num_drafts),
                ("pagedserve_spec_decode_num_draft_tokens", "Speculative proposals verified",
                 stats.spec_decode_num_draft_tokens),
                ("pagedserve_spec_decode_num_accepted_tokens", "Speculative proposals accepted",
                 stats.spec_decode_num_accepted_tokens)):
            yield CounterMetricFamily(name, doc, value=value)


METRICS = GatewayMetrics()
