"""Load and soak: many concurrent streaming clients against `pagedserve up`, round after round,
then checks that nothing leaked (issue 9).

The script starts `pagedserve up` (a tiny random-weight LLaMA from pagedserve/testing/tiny_models.py
unless
--model names one) on free loopback ports and warms it up with one full round. Each round,
--clients clients start together; each streams one request (completions or chat, prompts of
2-16 words, up to ~100 tokens, max_tokens 8-128, ignore_eos) over its own connection, and
--disconnect-fraction of them (default 10%) close the connection after a random number of
events. After each round it waits for the scheduler to go idle and records, per process
(gateway, scheduler, executor): open file descriptors, Linux tasks (threads), RSS.

Checked (exit status 1 and a FAILED line for each miss):
- zero 5xx (and, every request being valid and the queue long enough, no 4xx either);
- every stream a client read to the end is well-formed: JSON events of one id, one finish,
  a usage chunk that counts the tokens, `data: [DONE]` last;
- no leaked KV blocks: the scheduler's free blocks return to the count before the first round;
- no leaked file descriptors or tasks: each process's counts after the last round are at most
  the counts before the first round (after the warm-up) plus --fd-slack;
- memory not growing: each process's RSS after the last round within 5% of the lowest of the last
  three rounds (RSS that falls after the warm-up is not a leak).

Reported: requests/s, p50 / p99 time to first token, error counts, per-round figures.

    .venv/bin/python benchmarks/soak.py                       # 500 clients, 3 rounds
    .venv/bin/python benchmarks/soak.py --clients 50 --rounds 2   # the CI size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import psutil

from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import (
    free_consecutive_ports,
    internal_channel,
    shared_internal_secret,
)
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

READY_LINE = "pagedserve is up"
RSS_TOLERANCE = 0.05
WORDS = "the cat sat on a mat and then it ran far away from home to see the world".split()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=500, help="concurrent clients per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after the warm-up")
    parser.add_argument("--disconnect-fraction", type=float, default=0.1,
                        help="share of clients that drop their stream part-way")
    parser.add_argument("--model", default=None,
                        help="model directory; unset: a tiny random-weight LLaMA")
    parser.add_argument("--kv-cache-gib", default="0.05",
                        help="passed to `pagedserve up` (0.05: ~6500 blocks of the tiny model, "
                             "filled by the warm-up round's prefix cache)")
    parser.add_argument("--fd-slack", type=int, default=0,
                        help="file descriptors / tasks a process may hold above its start count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a round may take before it fails")
    return parser.parse_args(argv)


# -- the clients -------------------------------------------------------------------------

@dataclass
class ClientPlan:
    chat: bool
    words: int
    max_tokens: int
    # Events to read before hanging up; None: read the stream to its end.
    drop_after: int | None


@dataclass
class Outcome:
    status: int | None = None
    ttft_s: float | None = None
    dropped: bool = False
    malformed: str | None = None  # why the stream was not well-formed
    error: str | None = None  # transport failure


def plan_clients(count: int, disconnect_fraction: float, rng: random.Random) -> list[ClientPlan]:
    plans = []
    for i in range(count):
        max_tokens = rng.choice([8, 16, 32, 64, 128])
        drop = i < round(count * disconnect_fraction)
        plans.append(ClientPlan(chat=rng.random() < 0.5, words=rng.choice([2, 5, 10, 16]),
                                max_tokens=max_tokens,
                                drop_after=rng.randint(1, max_tokens // 2) if drop else None))
    rng.shuffle(plans)
    return plans


def request_body(plan: ClientPlan, rng: random.Random) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(plan.words))
    common = {"max_tokens": plan.max_tokens, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}, "temperature": 1.0}
    if plan.chat:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                        **common}
    return "/v1/completions", {"prompt": text, **common}


def check_stream(events: list[str], plan: ClientPlan) -> str | None:
    """Why the events of a stream read to its end are not well-formed; None if they are."""
    if not events or events[-1] != "[DONE]":
        return "no [DONE] at the end"
    try:
        chunks = [json.loads(e) for e in events[:-1]]
    except json.JSONDecodeError as exc:
        return f"an event is not JSON ({exc})"
    if any("error" in c for c in chunks):
        return f"error event: {next(c for c in chunks if 'error' in c)}"
    if len({c["id"] for c in chunks}) != 1:
        return "events of several ids"
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    if finishes != ["length"]:
        return f"finish reasons {finishes}, expected one 'length'"
    usage = chunks[-1].get("usage")
    if chunks[-1]["choices"] or not usage or usage["completion_tokens"] != plan.max_tokens:
        return f"last chunk {chunks[-1]} is not the usage of {plan.max_tokens} tokens"
    return None


async def run_client(session: aiohttp.ClientSession, base: str, plan: ClientPlan,
                     rng: random.Random) -> Outcome:
    path, body = request_body(plan, rng)
    outcome = Outcome()
    start = time.perf_counter()
    events: list[str] = []
    try:
        async with session.post(base + path, json=body) as reply:
            outcome.status = reply.status
            if reply.status != 200:
                return outcome
            async for line in reply.content:
                if not line.startswith(b"data: "):
                    continue
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - start
                events.append(line[6:].decode().strip())
                if plan.drop_after is not None and len(events) >= plan.drop_after:
                    outcome.dropped = True
                    reply.close()  # hang up mid-stream
                    return outcome
    except (TimeoutError, aiohttp.ClientError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.malformed = check_stream(events, plan)
    return outcome


async def run_round(base: str, plans: list[ClientPlan], seed: int,
                    timeout: float) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    # One connection per client, as independent clients would have.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(run_client(session, base, plan, random.Random(
            rng.random())) for plan in plans))
        return list(outcomes), time.perf_counter() - start


# -- the stack ---------------------------------------------------------------------------

@dataclass
class Snapshot:
    fds: int
    tasks: int
    rss_mib: float


@dataclass
class Stack:
    process: subprocess.Popen
    base: str
    scheduler: str
    children: dict[str, psutil.Process] = field(default_factory=dict)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        with internal_channel(self.scheduler, Role.GATEWAY) as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=10)

    def wait_idle(self, timeout: float = 60) -> scheduler_pb2.SchedulerStats:
        """The scheduler's stats once no sequence runs or waits (or after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if (stats.num_running == 0 and stats.num_waiting == 0) \
                    or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def snapshot(self) -> dict[str, Snapshot]:
        return {name: Snapshot(p.num_fds(), p.num_threads(), p.memory_info().rss / 2**20)
                for name, p in self.children.items()}


def start_stack(model: str, kv_cache_gib: str, log_path: pathlib.Path) -> Stack:
    shared_internal_secret()  # `up` takes it from the environment; stats() calls with it
    http, grpc_port, scheduler = free_ports(3)
    executor = free_consecutive_ports(1)
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "up", "--model", model, "--kv-cache-gib",
         kv_cache_gib, "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--scheduler-port", str(scheduler), "--executor-port", str(executor),
         "--log-format", "json", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    while READY_LINE not in (line := process.stdout.readline()):
        if not line and process.poll() is not None:
            raise SystemExit(f"pagedserve up exited; see {log_path}")
    stack = Stack(process, f"http://127.0.0.1:{http}", f"127.0.0.1:{scheduler}")
    for child in psutil.Process(process.pid).children():
        stack.children[child.cmdline()[3]] = child  # python -m pagedserve <service>
    while not stack.stats().executors:
        time.sleep(0.2)
    return stack


def stop_stack(stack: Stack) -> None:
    stack.process.terminate()
    stack.process.wait(timeout=60)


# -- the report --------------------------------------------------------------------------

@dataclass
class RoundReport:
    outcomes: list[Outcome]
    wall_s: float
    free_blocks: int
    snapshot: dict[str, Snapshot]

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and not o.dropped and not o.error]

    def line(self, number: int) -> str:
        ttfts = sorted(o.ttft_s for o in self.outcomes if o.ttft_s is not None)
        statuses = Counter(o.status for o in self.outcomes)
        per_process = ", ".join(f"{name} {s.fds} fds / {s.tasks} tasks / {s.rss_mib:.0f} MiB"
                                for name, s in self.snapshot.items())
        rate = len(self.completed) / self.wall_s
        return (f"| {number} | {len(self.completed)} | "
                f"{sum(o.dropped for o in self.outcomes)} | {rate:.1f} "
                f"| {percentile(ttfts, 50):.3f} | {percentile(ttfts, 99):.3f} | "
                f"{dict(statuses)} | {per_process} |")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def failures(start_blocks: int, start: dict[str, Snapshot], rounds: list[RoundReport],
             fd_slack: int) -> list[str]:
    found = []
    for number, report in enumerate(rounds, 1):
        refused = Counter(o.status for o in report.outcomes if o.status not in (200, None))
        if refused:  # 5xx above all; every request here is valid, so 4xx are failures too
            found.append(f"round {number}: answers other than 200: {dict(refused)}")
        errors = [o.error for o in report.outcomes if o.error]
        if errors:
            found.append(f"round {number}: {len(errors)} transport errors, e.g. {errors[0]}")
        malformed = [o.malformed for o in report.outcomes if o.malformed]
        if malformed:
            found.append(f"round {number}: {len(malformed)} malformed streams, e.g. "
                         f"{malformed[0]}")
        if report.free_blocks != start_blocks:
            found.append(f"round {number}: {start_blocks - report.free_blocks} KV blocks leaked")
    last = rounds[-1].snapshot
    for name, before in start.items():
        after = last[name]
        if after.fds > before.fds + fd_slack or after.tasks > before.tasks + fd_slack:
            found.append(f"{name}: {before.fds} -> {after.fds} fds, {before.tasks} -> "
                         f"{after.tasks} tasks")
        # A leak grows: the last round above the lowest of the last rounds. RSS that falls
        # (the allocator returning memory after the warm-up) is not one.
        rss = [r.snapshot[name].rss_mib for r in rounds[-3:]]
        if rss[-1] > min(rss) * (1 + RSS_TOLERANCE):
            found.append(f"{name}: RSS grew over the last rounds: "
                         f"{', '.join(f'{v:.1f}' for v in rss)} MiB")
    return found


def summary(rounds: list[RoundReport]) -> str:
    outcomes = [o for r in rounds for o in r.outcomes]
    completed = sum(len(r.completed) for r in rounds)
    ttfts = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
    statuses = Counter(o.status for o in outcomes)
    return (f"total: {completed} completed streams in {sum(r.wall_s for r in rounds):.1f} s "
            f"({completed / sum(r.wall_s for r in rounds):.1f} req/s), "
            f"{sum(o.dropped for o in outcomes)} dropped by their clients; TTFT p50 "
            f"{percentile(ttfts, 50):.3f} s, p99 {percentile(ttfts, 99):.3f} s; statuses "
            f"{dict(statuses)}; transport errors {sum(bool(o.error) for o in outcomes)}; "
            f"malformed streams {sum(bool(o.malformed) for o in outcomes)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="pagedserve-soak-") as tmp:
        model = args.model
        if model is None:
            from pagedserve.testing.tiny_models import save_tiny_llama
            model = str(save_tiny_llama(pathlib.Path(tmp) / "tiny-llama"))
        stack = start_stack(model, args.kv_cache_gib, pathlib.Path(tmp) / "stack.log")
        try:
            # A full round first: the prefix cache, allocator arenas and connection pools
            # reach their working size before anything is counted.
            warm = plan_clients(args.clients, args.disconnect_fraction, rng)
            asyncio.run(run_round(stack.base, warm, rng.randrange(2**32), args.timeout))
            start_blocks = stack.wait_idle().executors[0].free_blocks
            time.sleep(1)  # let closed connections settle before counting
            start = stack.snapshot()
            print(f"{args.clients} clients x {args.rounds} rounds, "
                  f"{args.disconnect_fraction:.0%} disconnecting; model {model}")
            print("| round | completed | dropped | req/s | TTFT p50 s | TTFT p99 s | statuses "
                  "| after the round |\n|---|---|---|---|---|---|---|---|")
            rounds = []
            for number in range(1, args.rounds + 1):
                plans = plan_clients(args.clients, args.disconnect_fraction, rng)
                outcomes, wall_s = asyncio.run(run_round(stack.base, plans,
                                                         rng.randrange(2**32), args.timeout))
                stats = stack.wait_idle()
                time.sleep(1)
                rounds.append(RoundReport(outcomes, wall_s, stats.executors[0].free_blocks,
                                          stack.snapshot()))
                print(rounds[-1].line(number), flush=True)
        finally:
            stop_stack(stack)
    print(summary(rounds))
    print("before the rounds: " + ", ".join(
        f"{name} {s.fds} fds / {s.tasks} tasks / {s.rss_mib:.0f} MiB"
        for name, s in start.items()) + f"; {start_blocks} free KV blocks")
    found = failures(start_blocks, start, rounds, args.fd_slack)
    for failure in found:
        print(f"FAILED: {failure}")
    print("PASSED" if not found else f"{len(found)} checks FAILED")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
