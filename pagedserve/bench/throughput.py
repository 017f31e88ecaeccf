"""`pagedserve bench throughput`: the workload in-process through
`pagedserve.entrypoints.offline.LLM`.

One `generate` call over every request is timed (building the engine and the warm-up are not),
as `vllm bench throughput` does. Beside tok/s it reports what the engine itself counted in the
timed call: steps, mean batch size (sequences per step), mean tokens per step, preemptions, and
the prefix cache's hit rate (prompt tokens served from cache / prompt tokens looked up).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import structlog

from pagedserve.bench.datasets import BenchRequest, warmup_requests

log = structlog.get_logger("pagedserve.bench")


@dataclass(frozen=True)
class EngineCounters:
    """Cumulative counters of an LLM; subtract two snapshots for one call's share."""

    steps: int = 0
    sequences: int = 0
    scheduled_tokens: int = 0
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    # Speculative decoding: decodes planned with proposals, proposals verified and accepted.
    spec_decode_drafts: int = 0
    spec_decode_draft_tokens: int = 0
    spec_decode_accepted_tokens: int = 0

    @classmethod
    def of(cls, llm) -> EngineCounters:
        scheduler, prefix = llm.scheduler.counters, llm.blocks.stats
        return cls(steps=llm.executed.steps, sequences=llm.executed.sequences,
                   scheduled_tokens=scheduler.scheduled_tokens,
                   preemptions=scheduler.preemptions,
                   prefix_queried_tokens=prefix.queried_tokens,
                   prefix_hit_tokens=prefix.hit_tokens,
                   spec_decode_drafts=scheduler.speculative_decodes,
                   spec_decode_draft_tokens=scheduler.draft_tokens,
                   spec_decode_accepted_tokens=scheduler.accepted_tokens)

    def __sub__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(**{k: v - getattr(other, k) for k, v in asdict(self).items()})

    def to_dict(self) -> dict:
        return {**asdict(self),
                "mean_batch_size": self.sequences / self.steps if self.steps else 0.0,
                "mean_tokens_per_step": self.scheduled_tokens / self.steps if self.steps else 0.0,
                "prefix_hit_rate": (self.prefix_hit_tokens / self.prefix_queried_tokens
                                    if self.prefix_queried_tokens else 0.0),
                "spec_decode_acceptance_rate": (
                    self.spec_decode_accepted_tokens / self.spec_decode_draft_tokens
                    if self.spec_decode_draft_tokens else 0.0),
                # Tokens per decode that could speculate: 1 + the proposals it accepted.
                "spec_decode_mean_accepted_length": (
                    1 + self.spec_decode_accepted_tokens / self.spec_decode_drafts
                    if self.spec_decode_drafts else 0.0)}


@dataclass(frozen=True)
class ThroughputResult:
    num_prompts: int
    elapsed_s: float
    total_input_tokens: int
    total_output_tokens: int
    # Requests whose output length differs from the one asked for (0 with --ignore-eos).
    output_len_mismatches: int
    counters: EngineCounters

    def to_dict(self) -> dict:
        return {"num_prompts": self.num_prompts, "elapsed_s": self.elapsed_s,
                "total_input_tokens": self.total_input_tokens,
                "total_output_tokens": self.total_output_tokens,
                "request_throughput": self.num_prompts / self.elapsed_s,
                "output_throughput": self.total_output_tokens / self.elapsed_s,
                "total_token_throughput":
                    (self.total_input_tokens + self.total_output_tokens) / self.elapsed_s,
                "output_len_mismatches": self.output_len_mismatches,
                **self.counters.to_dict()}


def build_llm(model: str | None, engine_options: dict):
    """The offline engine, imported here: it loads torch and the model."""
    from pagedserve.entrypoints.offline import LLM

    return LLM(model, **engine_options)


def run_offline(llm, requests: Sequence[BenchRequest], *, ignore_eos: bool,
                temperature: float = 0.0) -> ThroughputResult:
    """Time one `generate` over every request and take the engine's counters for it."""
    from pagedserve.v1.common_pb2 import SamplingParams

    prompts = [list(r.prompt_token_ids) if r.prompt_token_ids else r.prompt for r in requests]
    params = [SamplingParams(max_tokens=r.output_len, temperature=temperature,
                             ignore_eos=ignore_eos) for r in requests]
    before = EngineCounters.of(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    return ThroughputResult(
        num_prompts=len(requests), elapsed_s=elapsed,
        total_input_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        total_output_tokens=sum(lengths),
        output_len_mismatches=sum(n != r.output_len for n, r in zip(lengths, requests,
                                                                    strict=True)),
        counters=EngineCounters.of(llm) - before)


def warm_up(llm, requests: Sequence[BenchRequest], count: int) -> None:
    """A few short requests before the clock starts: a fresh engine's first steps are slow."""
    if count:
        run_offline(llm, warmup_requests(requests, count), ignore_eos=True)


def format_result(result: ThroughputResult) -> str:
    d = result.to_dict()
    rows = [("Requests", d["num_prompts"]), ("Elapsed (s)", f"{d['elapsed_s']:.2f}"),
            ("Total input tokens", d["total_input_tokens"]),
            ("Total generated tokens", d["total_output_tokens"]),
            ("Output length mismatches", d["output_len_mismatches"]),
            ("Request throughput (req/s)", f"{d['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{d['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{d['total_token_throughput']:.2f}"),
            ("Engine steps", d["steps"]), ("Mean batch size (seqs)", f"{d['mean_batch_size']:.1f}"),
            ("Mean tokens per step", f"{d['mean_tokens_per_step']:.1f}"),
            ("Preemptions", d["preemptions"]),
            ("Prefix cache hit rate", f"{d['prefix_hit_rate']:.1%}")]
    if d["spec_decode_drafts"]:
        rows += [("Draft acceptance rate", f"{d['spec_decode_acceptance_rate']:.1%}"),
                 ("Mean accepted length", f"{d['spec_decode_mean_accepted_length']:.2f}")]
    return "\n".join([" Offline Throughput Result ".center(50, "="),
                      *(f"{name + ':':<40}{value!s:>10}" for name, value in rows), "=" * 50])
