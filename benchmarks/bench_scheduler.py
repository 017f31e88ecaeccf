"""Scheduler costs: planning time per step, executor idle time between steps, KV slots wasted.

Three measurements (``--only plan|overlap|kv`` runs one of them):

1. **plan** - the scheduler alone. A ``StepScheduler`` over a ``BlockManager`` large enough that
   nothing is ever preempted, with a constant population of ``--plan-running`` running requests
   (default 256 = max_num_seqs, so they decode) and ``--plan-waiting`` queued ones (default 64).
   Every request has ignore_eos and a random max_tokens, so requests finish at different
   steps; each finished one is replaced by a new one (outside the timed calls). A fake executor
   answers each plan instantly, tracking every request as the model runner does: a request
   samples (one token) when a step computes its last known token. The loop is the pool loop's
   (``scheduler_svc/pagedserve/scheduler/pool_loop.py``), with overlap on (the default: a plan is
   made while the previous one is in flight) and off. After a warm-up, ``schedule()`` and
   ``process(result)`` are timed separately, step by step; reported: median and p99 in ms.
2. **overlap** - the real executor in this process (``pagedserve.entrypoints.offline.LLM``, default
   model: the embedded SmolLM2-135M-Instruct, float32, on the CPU) generating for
   ``--overlap-requests`` requests (default 32, prompts of 32-256 random token ids, 64 output
   tokens, ignore_eos, greedy) with overlap on and off. The in-process handle's ``runner.step`` is
   wrapped to record each step's start and end on the executor thread: idle = start of step N+1 -
   end of step N. Reported per setting: steps, mean step time, total idle / total step time,
   end-to-end output tokens/s.
3. **kv** - KV slot waste with paging. The offline ``LLM`` (block size 16, prefix caching off so
   no block is shared) keeps ``--kv-concurrency`` requests in flight (default 64; prompts of
   16-512 tokens, 16-256 output tokens), replacing each finished one, until
   ``--kv-requests`` (default 256) have been submitted. After every plan made while the
   population is full (from the first finish to the last replacement): allocated slots = used
   blocks x block size, used slots = sum of the running sequences' computed (or scheduled)
   tokens; waste = (allocated - used) / allocated, reported as mean and p95. Then: how many
   requests of this mix fit in a fixed KV budget (``--kv-budget-tokens``, default 65,536 token
   slots) when paged (at each request's final length, rounded up to whole blocks; and at the
   measured mean footprint of a running sequence) versus reserving max_model_len tokens per
   request. Only memory accounting matters here, so the default model is a tiny random-weight
   LLaMA built in a temporary directory (``pagedserve.testing.tiny_models.save_tiny_llama``,
   max_position_embeddings 2048).

Run from the repository root (on an otherwise idle machine, for numbers worth keeping):

    .venv/bin/python benchmarks/bench_scheduler.py
    .venv/bin/python benchmarks/bench_scheduler.py --only plan --profile   # + cProfile, stderr
    .venv/bin/python benchmarks/bench_scheduler.py --output-markdown bench-scheduler.md
    .venv/bin/python benchmarks/bench_scheduler.py --quick --model DIR --kv-model DIR  # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import io
import itertools
import math
import os
import pathlib
import platform
import pstats
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from machine_info import cpu_info

from pagedserve.scheduler.admission import PoolLimits, admit_request
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.pool_loop import Overlap, PoolLoop, failures_into
from pagedserve.scheduler.step_scheduler import StepLimits, StepScheduler
from pagedserve.v1 import common_pb2, executor_pb2, scheduler_pb2

if TYPE_CHECKING:  # imported inside the functions that build one
    from pagedserve.entrypoints.offline import LLM

PARTS = ("plan", "overlap", "kv")


@dataclass(frozen=True)
class Sizes:
    plan_running: int
    plan_waiting: int
    plan_prompt: tuple[int, int]
    plan_output: tuple[int, int]
    plan_warmup: int
    plan_steps: int
    overlap_requests: int
    overlap_prompt: tuple[int, int]
    overlap_output: int
    kv_concurrency: int
    kv_requests: int
    kv_prompt: tuple[int, int]
    kv_output: tuple[int, int]


FULL = Sizes(plan_running=256, plan_waiting=64, plan_prompt=(32, 512), plan_output=(16, 512),
             plan_warmup=300, plan_steps=3000,
             overlap_requests=32, overlap_prompt=(32, 256), overlap_output=64,
             kv_concurrency=64, kv_requests=256, kv_prompt=(16, 512), kv_output=(16, 256))
QUICK = Sizes(plan_running=16, plan_waiting=4, plan_prompt=(8, 64), plan_output=(4, 32),
              plan_warmup=20, plan_steps=100,
              overlap_requests=4, overlap_prompt=(8, 32), overlap_output=8,
              kv_concurrency=8, kv_requests=24, kv_prompt=(8, 64), kv_output=(4, 32))

# Sizes that can be set on the command line (over the full or --quick defaults).
SIZE_FLAGS = {
    "plan_running": "running requests of the plan measurement (also its max_num_seqs)",
    "plan_waiting": "waiting requests of the plan measurement",
    "plan_steps": "timed steps of the plan measurement",
    "overlap_requests": "requests of the overlap measurement",
    "kv_concurrency": "requests in flight in the kv measurement",
    "kv_requests": "requests submitted in all in the kv measurement",
}

# Engine limits of the plan measurement (the executor's defaults).
MAX_NUM_BATCHED_TOKENS = 2048
BLOCK_SIZE = 16
# The token the fake executor "samples" (never an EOS of the fake model; ignore_eos anyway).
FAKE_TOKEN = 7
FAKE_VOCAB = 32000


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PARTS, help="run only this measurement")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--model", help="model of the overlap measurement: Hugging Face "
                        "directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--kv-model", help="model of the kv measurement (default: a tiny "
                        "random-weight LLaMA built in a temporary directory)")
    parser.add_argument("--kv-max-model-len", type=int,
                        help="max_model_len of the kv measurement (default: the model's)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.25,
                        help="KV pool of the kv measurement's engine (enough for the tiny model: "
                        "check that it reports 0 preemptions)")
    parser.add_argument("--kv-budget-tokens", type=int, default=65536,
                        help="KV budget (token slots) of the kv measurement's capacity table")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: every core this process may use)")
    for name, what in SIZE_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=what)
    parser.add_argument("--profile", action="store_true",
                        help="also profile schedule() + process() with cProfile (stderr)")
    parser.add_argument("--seed", type=int, default=0, help="seed of lengths and token ids")
    parser.add_argument("--output-markdown", type=pathlib.Path,
                        help="also write the report (machine, command, tables) to this file")
    args = parser.parse_args(argv)
    overrides = {name: getattr(args, name) for name in SIZE_FLAGS
                 if getattr(args, name) is not None}
    if any(value < 1 for value in overrides.values()):
        parser.error("sizes and step counts must be positive")
    args.sizes = dataclasses.replace(QUICK if args.quick else FULL, **overrides)
    return args


# --- a constant population of requests --------------------------------------------------------

@dataclass
class Population:
    """Keeps requests in a scheduler: every finished one is replaced by `refill` (called between
    steps, like a Submit arriving), until `total` have been submitted (None: forever)."""

    scheduler: StepScheduler
    limits: PoolLimits
    rng: random.Random
    prompt_lens: tuple[int, int]
    output_lens: tuple[int, int]
    vocab_size: int
    total: int | None = None
    temperature: float = 1.0
    submitted: int = 0
    finished: int = 0
    # prompt + output tokens of each finished request
    final_lengths: list[int] = field(default_factory=list)
    _pending: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    @property
    def full(self) -> bool:
        """Whether no submitted request is missing (all finished ones have been replaced)."""
        return self._pending == 0

    @property
    def exhausted(self) -> bool:
        return self.total is not None and self.submitted >= self.total

    def submit(self, count: int) -> None:
        for _ in range(count):
            if self.exhausted:
                return
            self._submit_one()

    def refill(self) -> None:
        pending, self._pending = self._pending, 0
        self.submit(pending)

    def _submit_one(self) -> None:
        prompt_len = self.rng.randint(*self.prompt_lens)
        prompt = [self.rng.randrange(3, self.vocab_size) for _ in range(prompt_len)]
        sampling = common_pb2.SamplingParams(max_tokens=self.rng.randint(*self.output_lens),
                                             ignore_eos=True, temperature=self.temperature)
        outputs = [0]

        def emit(delta: scheduler_pb2.TokenDelta) -> None:
            outputs[0] += len(delta.token_ids)
            if delta.finish_reason:
                self.finished += 1
                self.final_lengths.append(prompt_len + outputs[0])
                self._pending += 1

        request = admit_request(f"bench-{next(self._ids)}", prompt, sampling, 0, self.limits,
                                emit)
        self.scheduler.add(request)
        self.submitted += 1


# --- 1. planning cost with a fake executor ----------------------------------------------------

class FakeExecutor:
    """Answers a plan at once, as the model runner would: a request samples one token when a
    step computes its last known token (a prefill chunk that stops short samples nothing)."""

    def __init__(self) -> None:
        self.known: dict[str, int] = {}  # tokens the executor knows of each request
        self.computed: dict[str, int] = {}

    def step(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        for request_id in plan.dropped_request_ids:
            del self.known[request_id], self.computed[request_id]
        for new in plan.new_requests:
            self.known[new.request_id] = (self.known[new.fork_of] if new.fork_of
                                          else len(new.token_ids))
            self.computed[new.request_id] = new.num_computed_tokens
        result = executor_pb2.StepResult(step_id=plan.step_id)
        for work in plan.work:
            computed = self.computed[work.request_id] + work.num_tokens
            self.computed[work.request_id] = computed
            if computed == self.known[work.request_id]:
                self.known[work.request_id] += 1
                result.outputs.add(request_id=work.request_id, token_ids=[FAKE_TOKEN])
        return result


@dataclass
class PlanStats:
    overlap: bool
    schedule_ms: list[float]
    process_ms: list[float]
    running: list[int]
    waiting: list[int]
    work_items: list[int]
    tokens: list[int]
    preemptions: int
    finished: int


def make_plan_scheduler(sizes: Sizes) -> tuple[StepScheduler, PoolLimits]:
    max_len = sizes.plan_prompt[1] + sizes.plan_output[1]
    population = sizes.plan_running + sizes.plan_waiting
    num_blocks = population * -(-max_len // BLOCK_SIZE)  # every request at its longest
    blocks = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=True)
    max_model_len = max(2048, max_len)
    scheduler = StepScheduler(blocks, StepLimits(sizes.plan_running, MAX_NUM_BATCHED_TOKENS,
                                                 max_model_len), eos_token_ids=[2])
    limits = PoolLimits(max_model_len=max_model_len, num_blocks=num_blocks,
                        block_size=BLOCK_SIZE, max_num_seqs=sizes.plan_running,
                        vocab_size=FAKE_VOCAB, max_logprobs=0)
    return scheduler, limits


def run_plan(sizes: Sizes, overlap: bool, seed: int,
             profiler: cProfile.Profile | None = None) -> PlanStats:
    """Drive a scheduler and the fake executor like the pool loop does; time each call."""
    scheduler, limits = make_plan_scheduler(sizes)
    population = Population(scheduler, limits, random.Random(seed), sizes.plan_prompt,
                            sizes.plan_output, FAKE_VOCAB)
    population.submit(sizes.plan_running + sizes.plan_waiting)
    executor = FakeExecutor()
    in_flight: deque[executor_pb2.StepResult] = deque()
    max_in_flight = 2 if overlap else 1
    stats = PlanStats(overlap, [], [], [], [], [], [], 0, 0)
    timer = time.perf_counter_ns
    total = sizes.plan_warmup + sizes.plan_steps
    preemptions_before = finished_before = 0
    for step in range(total):
        timed = step >= sizes.plan_warmup
        if step == sizes.plan_warmup:
            preemptions_before = scheduler.counters.preemptions
            finished_before = population.finished
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        if timed and profiler:
            profiler.enable()
        start = timer()
        plan = scheduler.schedule()
        schedule_ns = timer() - start
        if timed and profiler:
            profiler.disable()
        if plan is None:
            raise RuntimeError("the scheduler had nothing to plan: the population ran dry")
        in_flight.append(executor.step(plan))
        process_ns = None
        if len(in_flight) == max_in_flight:
            result = in_flight.popleft()
            if timed and profiler:
                profiler.enable()
            start = timer()
            scheduler.process(result)
            process_ns = timer() - start
            if timed and profiler:
                profiler.disable()
            population.refill()
        if timed:
            stats.schedule_ms.append(schedule_ns / 1e6)
            if process_ns is not None:
                stats.process_ms.append(process_ns / 1e6)
            stats.running.append(running)
            stats.waiting.append(waiting)
            stats.work_items.append(len(plan.work))
            stats.tokens.append(sum(w.num_tokens for w in plan.work))
    stats.preemptions = scheduler.counters.preemptions - preemptions_before
    stats.finished = population.finished - finished_before
    return stats


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def plan_table(results: Sequence[PlanStats]) -> list[str]:
    lines = ["| overlap | schedule() median | schedule() p99 | process() median | process() p99 "
             "| running / waiting (mean) | work items / tokens per step (mean) "
             "| finished (timed steps) | preemptions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {'on' if r.overlap else 'off'} "
            f"| {statistics.median(r.schedule_ms):.3f} ms | {percentile(r.schedule_ms, 99):.3f} ms "
            f"| {statistics.median(r.process_ms):.3f} ms | {percentile(r.process_ms, 99):.3f} ms "
            f"| {statistics.fmean(r.running):.1f} / {statistics.fmean(r.waiting):.1f} "
            f"| {statistics.fmean(r.work_items):.1f} / {statistics.fmean(r.tokens):.0f} "
            f"| {r.finished} | {r.preemptions} |")
    return lines


def bench_plan(args: argparse.Namespace) -> list[str]:
    sizes = args.sizes
    results = []
    for overlap in (False, True):
        gc.collect()
        results.append(run_plan(sizes, overlap, args.seed))
        print(f"done: plan, overlap {'on' if overlap else 'off'}", file=sys.stderr, flush=True)
    if args.profile:  # a separate run: the profiler slows every call it sees
        profiler = cProfile.Profile()
        run_plan(sizes, True, args.seed, profiler)
        print_profile(profiler)
    return ["## 1. Scheduler cost per step (fake executor)", "",
            f"- population: {sizes.plan_running} running + {sizes.plan_waiting} waiting requests, "
            "kept constant (each finished request is replaced); prompts "
            f"{sizes.plan_prompt[0]}-{sizes.plan_prompt[1]} random tokens, max_tokens "
            f"{sizes.plan_output[0]}-{sizes.plan_output[1]} (uniform), ignore_eos",
            f"- max_num_seqs {sizes.plan_running}, max_num_batched_tokens "
            f"{MAX_NUM_BATCHED_TOKENS}, block size {BLOCK_SIZE}, prefix caching on, no "
            "preemption (the pool holds every request at its longest)",
            f"- {sizes.plan_warmup} warm-up steps, then {sizes.plan_steps} timed steps; the fake "
            "executor answers instantly (its time is not counted, nor is replacing finished "
            "requests)", "",
            *plan_table(results), "",
            "Target: schedule() median ≤ 1 ms."]


def print_profile(profiler: cProfile.Profile, limit: int = 25) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    print("cProfile of schedule() + process() over the timed steps of a separate run (overlap "
          "on), by own time:", file=sys.stderr)
    print(out.getvalue(), file=sys.stderr, flush=True)


# --- 2. executor idle time with overlap on and off --------------------------------------------

class StepClock:
    """Records (start, end) of each runner step, on the executor thread."""

    def __init__(self, step: Callable[[executor_pb2.StepPlan], executor_pb2.StepResult]):
        self._step = step
        self.spans: list[tuple[float, float]] = []

    def __call__(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        start = time.perf_counter()
        try:
            return self._step(plan)
        finally:
            self.spans.append((start, time.perf_counter()))


@dataclass
class OverlapStats:
    overlap: bool
    steps: int
    step_s: float  # total time inside runner.step
    idle_s: float  # total gap between consecutive steps
    wall_s: float  # generate() end to end
    output_tokens: int


def clocked_llm(model: str | None, overlap: bool,
                model_note: list[str]) -> tuple[LLM, Callable[[], StepClock]]:
    """An offline LLM whose executor's runner.step is timed, and a getter of its clock (which
    exists once the first generate has opened a handle)."""
    from pagedserve.entrypoints.offline import LLM

    llm = LLM(model, overlap=overlap, dtype="float32", device="cpu", kv_cache_gib=1.0)
    make_handle = llm.make_handle
    clock: StepClock | None = None

    def timed_handle():
        nonlocal clock
        handle = make_handle()
        if clock is None:
            clock = StepClock(handle.runner.step)
        handle.runner.step = clock  # an instance attribute: the handle calls runner.step
        return handle

    llm.make_handle = timed_handle
    model_note.append(str(llm.tokenizer_dir))
    return llm, lambda: clock


def overlap_prompts(sizes: Sizes, vocab: int, rng: random.Random) -> list[list[int]]:
    lengths = [rng.randint(*sizes.overlap_prompt) for _ in range(sizes.overlap_requests)]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def run_overlap(model: str | None, sizes: Sizes, overlap: bool, seed: int,
                model_note: list[str]) -> OverlapStats:
    llm, clock_of = clocked_llm(model, overlap, model_note)
    vocab = llm.pool_limits.vocab_size
    params = common_pb2.SamplingParams(max_tokens=sizes.overlap_output, ignore_eos=True,
                                       temperature=0.0)
    rng = random.Random(seed)
    llm.generate(overlap_prompts(dataclasses.replace(sizes, overlap_requests=2), vocab, rng),
                 common_pb2.SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
    clock = clock_of()
    clock.spans.clear()  # the warm-up above is not measured
    # Other tokens than the warm-up's, so no prefix cache hit; the same prompts for both
    # settings (each has its own engine, so its own prefix cache).
    prompts = overlap_prompts(sizes, vocab, random.Random(seed + 1))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    spans = clock.spans
    idle = sum(max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(spans))
    return OverlapStats(overlap, len(spans), sum(end - begin for begin, end in spans), idle,
                        wall, sum(len(c.token_ids) for o in outputs for c in o.outputs))


def bench_overlap(args: argparse.Namespace) -> list[str]:
    sizes = args.sizes
    results: list[OverlapStats] = []
    model_note: list[str] = []
    for overlap in (False, True):
        gc.collect()
        results.append(run_overlap(args.model, sizes, overlap, args.seed, model_note))
        print(f"done: overlap {'on' if overlap else 'off'}", file=sys.stderr, flush=True)
    lines = ["## 2. Executor idle time between steps (real executor, in process)", "",
             f"- model: {model_note[0]}, float32, cpu, torch threads {args.threads}",
             f"- {sizes.overlap_requests} requests, prompts {sizes.overlap_prompt[0]}-"
             f"{sizes.overlap_prompt[1]} random tokens, {sizes.overlap_output} output tokens "
             "each (ignore_eos, greedy), all submitted at once; one warm-up generate first",
             "- idle = start of step N+1 - end of step N, on the executor thread", "",
             "| overlap | steps | mean step time | idle / step time | mean idle per gap "
             "| wall time | output tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gaps = max(1, r.steps - 1)
        lines.append(f"| {'on' if r.overlap else 'off'} | {r.steps} "
                     f"| {r.step_s / r.steps * 1e3:.2f} ms | {r.idle_s / r.step_s * 100:.2f}% "
                     f"| {r.idle_s / gaps * 1e3:.3f} ms | {r.wall_s:.2f} s "
                     f"| {r.output_tokens / r.wall_s:,.1f} |")
    lines += ["", "Target: idle ≤ 5% of step time with overlap on."]
    return lines


# --- 3. KV waste with paging ------------------------------------------------------------------

@dataclass
class KvStats:
    waste: list[float]  # (allocated - used) / allocated, after each plan at full population
    allocated_per_seq: list[float]
    final_lengths: list[int]
    pool_tokens: int
    max_model_len: int
    block_size: int
    preemptions: int


def tiny_kv_model(directory: pathlib.Path) -> pathlib.Path:
    from pagedserve.testing.tiny_models import save_tiny_llama

    return save_tiny_llama(directory, max_position_embeddings=2048)


def run_kv(model_dir: str, sizes: Sizes, max_model_len: int | None, kv_cache_gib: float,
           seed: int) -> KvStats:
    from pagedserve.entrypoints.offline import LLM

    options = {"max_model_len": max_model_len} if max_model_len else {}
    llm = LLM(model_dir, enable_prefix_caching=False, dtype="float32", device="cpu",
              block_size=BLOCK_SIZE, kv_cache_gib=kv_cache_gib, **options)
    scheduler, blocks = llm.scheduler, llm.blocks
    population = Population(scheduler, llm.pool_limits, random.Random(seed), sizes.kv_prompt,
                            sizes.kv_output, llm.pool_limits.vocab_size,
                            total=sizes.kv_requests)
    waste: list[float] = []
    per_seq: list[float] = []
    schedule = scheduler.schedule

    def sampled_schedule() -> executor_pb2.StepPlan | None:
        population.refill()  # replacements arrive between steps, like Submits
        plan = schedule()
        if population.finished and population.full and not population.exhausted:
            allocated = blocks.num_used_blocks * blocks.block_size
            used = sum(seq.num_computed for seq in scheduler.running)
            if allocated:
                waste.append((allocated - used) / allocated)
                per_seq.append(allocated / len(scheduler.running))
        return plan

    scheduler.schedule = sampled_schedule
    population.submit(sizes.kv_concurrency)
    asyncio.run(drive(llm, population))
    return KvStats(waste, per_seq, population.final_lengths, blocks.num_blocks * blocks.block_size,
                   llm.pool_limits.max_model_len, blocks.block_size,
                   scheduler.counters.preemptions)


async def drive(llm: LLM, population: Population) -> None:
    """The pool loop over the in-process executor until every request has finished."""
    handle = llm.make_handle()
    lost: list[str] = []
    loop = PoolLoop(llm.scheduler, handle, Overlap.ALWAYS if llm.overlap else Overlap.NEVER,
                    failures_into(lost))
    task = asyncio.create_task(loop.run())
    loop.notify()
    try:
        while population.finished < population.total and not task.done():
            await asyncio.sleep(0.005)
        if lost:
            raise RuntimeError(f"the in-process executor failed: {lost[0]}")
    finally:
        task.cancel()
        await handle.close()


def bench_kv(args: argparse.Namespace) -> list[str]:
    sizes = args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        model = args.kv_model or str(tiny_kv_model(pathlib.Path(tmp) / "tiny-llama"))
        result = run_kv(model, sizes, args.kv_max_model_len, args.kv_cache_gib, args.seed)
        model_note = args.kv_model or "tiny random-weight LLaMA (pagedserve.testing.tiny_models)"
    print("done: kv", file=sys.stderr, flush=True)
    r, bs, budget = result, result.block_size, args.kv_budget_tokens
    mean_len = statistics.fmean(r.final_lengths)
    mean_paged = statistics.fmean(-(-n // bs) * bs for n in r.final_lengths)
    paged_fit = budget // math.ceil(mean_paged)
    reserved_fit = budget // r.max_model_len
    average_fit = budget // math.ceil(statistics.fmean(r.allocated_per_seq))
    return ["## 3. KV slots wasted by paging", "",
            f"- model: {model_note}; block size {bs}, prefix caching off, KV pool "
            f"{r.pool_tokens:,} tokens, max_model_len {r.max_model_len}",
            f"- {sizes.kv_concurrency} requests in flight, each finished one replaced, "
            f"{sizes.kv_requests} in all; prompts {sizes.kv_prompt[0]}-{sizes.kv_prompt[1]} "
            f"tokens, {sizes.kv_output[0]}-{sizes.kv_output[1]} output tokens (uniform, "
            f"ignore_eos); {r.preemptions} preemptions",
            f"- sampled after each of {len(r.waste)} plans made with the population full "
            "(first finish to last replacement); allocated = used blocks × block size, used = "
            "sum of the running sequences' computed tokens", "",
            "| waste (allocated - used) / allocated | mean | p95 | max |",
            "|---|---:|---:|---:|",
            f"| per plan | {statistics.fmean(r.waste) * 100:.2f}% "
            f"| {percentile(r.waste, 95) * 100:.2f}% | {max(r.waste) * 100:.2f}% |", "",
            f"Requests of this mix that fit at once in a KV budget of {budget:,} token slots "
            f"(mean final length {mean_len:.1f} tokens; the ratios hardly depend on the "
            "budget):", "",
            "| KV per request | slots per request | requests that fit | vs reserving |",
            "|---|---:|---:|---:|",
            f"| reserve max_model_len | {r.max_model_len} | {reserved_fit} | 1.0× |",
            f"| paged, at its final length (whole blocks) | {mean_paged:.1f} | {paged_fit} "
            f"| {paged_fit / max(1, reserved_fit):.1f}× |",
            f"| paged, time average while running (measured) "
            f"| {statistics.fmean(r.allocated_per_seq):.1f} | {average_fit} "
            f"| {average_fit / max(1, reserved_fit):.1f}× |", "",
            "Target: mean waste < 4%."]


# --- report -----------------------------------------------------------------------------------

def machine_lines() -> list[str]:
    import torch

    cpu, physical = cpu_info()
    return [f"- CPU: {cpu}",
            f"- cores: {os.cpu_count()} logical" + (f", {physical} physical" if physical else "")
            + f", {len(os.sched_getaffinity(0))} usable by this process",
            f"- torch {torch.__version__}, Python {platform.python_version()}, torch threads "
            f"{torch.get_num_threads()}"]


def report(sections: Sequence[list[str]]) -> str:
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    lines = ["# Scheduler benchmark", "", *machine_lines(), "", "```", command, "```"]
    for section in sections:
        lines += ["", *section]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from pagedserve.runtime.log import configure_logging

    configure_logging("bench-scheduler", "warning", "console")  # stderr: stdout is the report
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    benches = {"plan": bench_plan, "overlap": bench_overlap, "kv": bench_kv}
    sections = [benches[part](args) for part in PARTS if args.only in (None, part)]
    text = report(sections)
    print(text, end="")
    if args.output_markdown:
        args.output_markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
