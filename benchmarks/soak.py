"""Load and soak: many concurrent streaming clients against `pagedserve up`, round after round,
then checks that nothing leaked (issue 9); with --chaos, an executor and then the scheduler are
SIGKILLed mid-round and every stream must still end with the tokens of an undisturbed round
(issue 17).

The script starts `pagedserve up` (a tiny random-weight LLaMA from pagedserve/testing/tiny_models.py
unless --model names one; --executors executors, 2 with --chaos) on free loopback ports and
warms it up with one full round. Each round, --clients clients start together; each streams one
request (completions or chat, prompts of 2-16 words, up to ~100 tokens, max_tokens 8-128,
ignore_eos) over its own connection, and --disconnect-fraction of them (default 10%) close the
connection after a random number of events. After each round it waits for the scheduler to go
idle and records, per process (gateway, scheduler, each executor, found with psutil under `up`
again after every round, so a restarted child is seen under its new pid): open file
descriptors, Linux tasks (threads), RSS.

--chaos: every round after the warm-up replays one set of requests, each a function of the
client's index only: even clients greedy (temperature 0), odd ones sampled at temperature 1
with a seed of their own. Round 1 is the undisturbed reference. In round 2 (the chaos round),
once --kill-executor-at of the round's stream events have reached the clients, executor 0 gets
SIGKILL; once the scheduler has dropped it and --kill-scheduler-at have, the scheduler gets
SIGKILL (whether or not the executor is back). `up` restarts both; the gateway resubmits its
requests to the new scheduler. Further rounds (--rounds 3 and up) are undisturbed again, and
RSS is compared from the chaos round on. For each kill the script reports the longest pause a
client saw across it: over the streams with events both before and after the kill, the largest
gap between consecutive events from the last one before the kill until the next kill (or the
end), and how long the child took to be back (new pid, registered with the scheduler).

Checked (exit status 1 and a FAILED line for each miss):
- zero 5xx (and, every request being valid and the queue long enough, no 4xx either), no
  transport errors;
- every stream a client read to the end is well-formed: JSON events of one id, one finish,
  a usage chunk that counts the tokens, `data: [DONE]` last;
- no leaked KV blocks: once the scheduler is idle, every executor's blocks are free again
  (free == total; cached blocks count as free), and every executor is registered;
- no leaked file descriptors or tasks: each process's counts after the last round are at most
  the counts before the first round (after the warm-up) plus --fd-slack. A process restarted in
  between (a new pid) is not compared and is reported as restarted;
- memory not growing: each process's RSS after the last round within 5% of the lowest of the last
  three rounds (RSS that falls after the warm-up is not a leak; rounds before a restart of the
  process are left out);
- --chaos: every kill landed mid-round on a live process and `up` restarted it; every stream
  of every replayed round has the text of the reference round (streams a client hung up on: one
  text a prefix of the other); `up` itself never stopped.

Reported: requests/s, p50 / p99 time to first token, error counts, per-round figures.

    .venv/bin/python benchmarks/soak.py                       # 500 clients, 3 rounds
    .venv/bin/python benchmarks/soak.py --clients 50 --rounds 2   # the CI size
    .venv/bin/python benchmarks/soak.py --chaos --rounds 4    # reference, chaos, 2 rounds after
    .venv/bin/python benchmarks/soak.py --chaos --clients 40 --rounds 2   # the CI chaos size
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
import grpc
import psutil

from pagedserve.runtime.internal_auth import Role
from pagedserve.testing.processes import internal_channel, shared_internal_secret, stack_ports
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

READY_LINE = "pagedserve is up"
RSS_TOLERANCE = 0.05
WORDS = "the cat sat on a mat and then it ran far away from home to see the world".split()
CHAOS_ROUND = 2
# Seconds the stack may take to come back after the chaos round (restarts, re-registration).
RECOVERY_TIMEOUT_S = 180.0


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
    parser.add_argument("--executors", type=int, default=None,
                        help="executor processes (`up --executors`); default 1, 2 with --chaos")
    parser.add_argument("--chaos", action="store_true",
                        help="replay one request set each round (greedy and seeded); in round "
                             f"{CHAOS_ROUND} SIGKILL executor 0, then the scheduler, and check "
                             "every stream against round 1")
    parser.add_argument("--kill-executor-at", type=float, default=0.1,
                        help="--chaos: share of the chaos round's stream events after which "
                             "executor 0 is killed")
    parser.add_argument("--kill-scheduler-at", type=float, default=0.3,
                        help="--chaos: share of the chaos round's stream events after which "
                             "the scheduler is killed")
    parser.add_argument("--fd-slack", type=int, default=0,
                        help="file descriptors / tasks a process may hold above its start count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds a round may take before it fails")
    args = parser.parse_args(argv)
    if args.executors is None:
        args.executors = 2 if args.chaos else 1
    if args.chaos and (args.executors < 2 or args.rounds < CHAOS_ROUND):
        parser.error(f"--chaos needs --executors 2 or more and --rounds {CHAOS_ROUND} or more")
    if args.chaos and not 0 < args.kill_executor_at < args.kill_scheduler_at < 1:
        parser.error("--chaos needs 0 < --kill-executor-at < --kill-scheduler-at < 1")
    return args


# -- the clients -------------------------------------------------------------------------

@dataclass
class ClientPlan:
    chat: bool
    words: int
    max_tokens: int
    # Events to read before hanging up; None: read the stream to its end.
    drop_after: int | None
    # --chaos: None: greedy; otherwise sampled at temperature 1 with this seed. Unset (the
    # plain soak): sampled at temperature 1 without a seed.
    seed: int | None = None
    replayed: bool = False

    @property
    def events(self) -> int:
        """Stream events the client reads, about: a token each, a usage chunk, [DONE]."""
        return self.drop_after if self.drop_after is not None else self.max_tokens + 2


@dataclass
class Outcome:
    status: int | None = None
    ttft_s: float | None = None
    dropped: bool = False
    malformed: str | None = None  # why the stream was not well-formed
    error: str | None = None  # transport failure
    text: str = ""  # the generated text the client received
    # time.monotonic() of each stream event.
    arrivals: list[float] = field(default_factory=list, repr=False)


def plan_clients(count: int, disconnect_fraction: float, rng: random.Random,
                 replayed: bool = False) -> list[ClientPlan]:
    plans = []
    for i in range(count):
        max_tokens = rng.choice([8, 16, 32, 64, 128])
        drop = i < round(count * disconnect_fraction)
        plans.append(ClientPlan(chat=rng.random() < 0.5, words=rng.choice([2, 5, 10, 16]),
                                max_tokens=max_tokens,
                                drop_after=rng.randint(1, max_tokens // 2) if drop else None))
    rng.shuffle(plans)
    if replayed:  # after the shuffle: whether a client is greedy depends on its index only
        for i, plan in enumerate(plans):
            plan.replayed = True
            plan.seed = None if i % 2 == 0 else 1000 + i
    return plans


def request_body(plan: ClientPlan, rng: random.Random) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(plan.words))
    common = {"max_tokens": plan.max_tokens, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}, "temperature": 1.0}
    if plan.replayed:
        common["temperature"] = 0.0 if plan.seed is None else 1.0
        if plan.seed is not None:
            common["seed"] = plan.seed
    if plan.chat:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                        **common}
    return "/v1/completions", {"prompt": text, **common}


def chunk_text(chunk: dict) -> str:
    return "".join(choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                   for choice in chunk.get("choices") or [])


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


class Progress:
    """Stream events received so far in a round, and futures waiting for a count."""

    def __init__(self) -> None:
        self.events = 0
        self.waiters: list[tuple[int, asyncio.Future]] = []

    def add(self) -> None:
        self.events += 1
        for waiter in [w for w in self.waiters if w[0] <= self.events]:
            self.waiters.remove(waiter)
            if not waiter[1].done():
                waiter[1].set_result(None)

    async def reach(self, count: int) -> None:
        if self.events >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((count, future))
        await future


async def run_client(session: aiohttp.ClientSession, base: str, plan: ClientPlan,
                     rng: random.Random, progress: Progress) -> Outcome:
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
                outcome.arrivals.append(time.monotonic())
                progress.add()
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - start
                events.append(line[6:].decode().strip())
                try:
                    outcome.text += chunk_text(json.loads(events[-1]))
                except (json.JSONDecodeError, AttributeError):
                    pass  # [DONE], or a malformed event check_stream names
                if plan.drop_after is not None and len(events) >= plan.drop_after:
                    outcome.dropped = True
                    reply.close()  # hang up mid-stream
                    return outcome
    except (TimeoutError, aiohttp.ClientError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    outcome.malformed = check_stream(events, plan)
    return outcome


async def run_round(base: str, plans: list[ClientPlan], seed: int, timeout: float,
                    chaos: Chaos | None = None) -> tuple[list[Outcome], float]:
    # One connection per client, as independent clients would have.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    progress = Progress()
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        start = time.perf_counter()
        # Each client's prompt depends on the round's seed and its index only: a round
        # replayed with the same plans and seed sends the same requests.
        clients = asyncio.gather(*(run_client(session, base, plan,
                                              random.Random(f"{seed}/{i}"), progress)
                                   for i, plan in enumerate(plans)))
        if chaos is not None:
            chaos.started = time.monotonic()
            killer = asyncio.create_task(chaos.run(progress, sum(p.events for p in plans)))
        outcomes = await clients
        wall_s = time.perf_counter() - start
        if chaos is not None:
            if len(chaos.kills) < 2:
                killer.cancel()
                chaos.missed.append(f"the round ended after {len(chaos.kills)} of 2 kills "
                                    "(a longer round: more --clients, or earlier kills)")
            else:
                await killer  # the scheduler being back
        return list(outcomes), wall_s


# -- the stack ---------------------------------------------------------------------------

@dataclass
class Snapshot:
    pid: int
    fds: int
    tasks: int
    rss_mib: float


@dataclass
class Stack:
    process: subprocess.Popen
    base: str
    scheduler: str
    executors: int
    executor_port: int  # executor i listens on this + i

    def executor_address(self, name: str) -> str:
        """'executor 1' -> its address."""
        return f"127.0.0.1:{self.executor_port + int(name.split()[1])}"

    def children(self) -> dict[str, psutil.Process]:
        """`up`'s live children by name: scheduler, executor 0..N-1 (by port), gateway."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                argv = child.cmdline()  # python -m pagedserve <service> ... --port N ...
            except psutil.NoSuchProcess:
                continue
            if len(argv) < 4:
                continue  # a zombie, not reaped yet
            if argv[3] == "executor":
                found[f"executor {int(argv[argv.index('--port') + 1]) - self.executor_port}"] = \
                    child
            else:
                found[argv[3]] = child
        return found

    def stats(self) -> scheduler_pb2.SchedulerStats:
        with internal_channel(self.scheduler, Role.GATEWAY) as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=10)

    def wait_idle(self, timeout: float = 60) -> scheduler_pb2.SchedulerStats:
        """The scheduler's stats once every executor is registered and no sequence runs or
        waits (or after `timeout`); a scheduler that does not answer yet (restarting) is
        asked again."""
        deadline = time.monotonic() + timeout
        stats = None
        while True:
            try:
                stats = self.stats()
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            else:
                if (stats.num_running == 0 and stats.num_waiting == 0
                        and len(stats.executors) == self.executors) \
                        or time.monotonic() > deadline:
                    return stats
            time.sleep(0.1)

    def snapshot(self) -> dict[str, Snapshot]:
        return {name: Snapshot(p.pid, p.num_fds(), p.num_threads(), p.memory_info().rss / 2**20)
                for name, p in sorted(self.children().items(), key=lambda c: order(c[0]))}


def order(name: str) -> tuple[int, str]:
    return ({"scheduler": 0, "gateway": 2}.get(name, 1), name)


def start_stack(model: str, kv_cache_gib: str, executors: int, log_path: pathlib.Path) -> Stack:
    shared_internal_secret()  # `up` takes it from the environment; stats() calls with it
    http, grpc_port, scheduler, executor = stack_ports(executors)
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "up", "--model", model, "--kv-cache-gib",
         kv_cache_gib, "--http-port", str(http), "--grpc-port", str(grpc_port),
         "--scheduler-port", str(scheduler), "--executor-port", str(executor),
         "--executors", str(executors), "--log-format", "json", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    while READY_LINE not in (line := process.stdout.readline()):
        if not line and process.poll() is not None:
            raise SystemExit(f"pagedserve up exited; see {log_path}")
    stack = Stack(process, f"http://127.0.0.1:{http}", f"127.0.0.1:{scheduler}", executors,
                  executor)
    while len(stack.stats().executors) < executors:
        time.sleep(0.2)
    return stack


def stop_stack(stack: Stack) -> None:
    stack.process.terminate()
    stack.process.wait(timeout=60)


# -- chaos -------------------------------------------------------------------------------

@dataclass
class Kill:
    name: str  # the child: "executor 0", "scheduler"
    pid: int
    at: float  # time.monotonic()
    # What the scheduler had in flight just before: sequences running on the victim executor,
    # or running + waiting in the whole scheduler.
    in_flight: int
    progress: float  # share of the round's stream events the clients had received
    # Seconds from the kill until the child ran again under a new pid, the scheduler answered
    # and every executor was registered with it; None: not back (yet).
    back_s: float | None = None


@dataclass
class Chaos:
    """SIGKILL of executor 0, then of the scheduler, at shares of a round's stream events."""

    stack: Stack
    executor_at: float
    scheduler_at: float
    started: float = 0.0  # time.monotonic() at the round's start
    kills: list[Kill] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)  # kills that did not land as planned

    async def run(self, progress: Progress, expected_events: int) -> None:
        """Kills executor 0 at its share of the events; once the scheduler has dropped it (its
        requests requeued) and the scheduler's share is reached, kills the scheduler. Then
        waits until both are back."""
        backs = []
        for name, share in (("executor 0", self.executor_at), ("scheduler", self.scheduler_at)):
            await progress.reach(max(1, round(share * expected_events)))
            if name == "scheduler" and self.kills:
                await asyncio.to_thread(self._wait_dropped, self.kills[-1])
            await asyncio.to_thread(self._kill, name, progress.events / expected_events)
            if self.kills and self.kills[-1].name == name:
                backs.append(asyncio.create_task(asyncio.to_thread(self._wait_back,
                                                                   self.kills[-1])))
        await asyncio.gather(*backs)

    def _wait_dropped(self, kill: Kill) -> None:
        while time.monotonic() < kill.at + RECOVERY_TIMEOUT_S:
            try:
                addresses = {e.address for e in self.stack.stats().executors}
            except grpc.RpcError:
                addresses = set()
            if self.stack.executor_address(kill.name) not in addresses:
                return
            time.sleep(0.02)

    def _wait_back(self, kill: Kill) -> None:
        # Back: the child runs again under a new pid, and the scheduler answers with every
        # executor registered (after dropping a killed executor).
        gone = kill.name == "scheduler"
        while time.monotonic() < kill.at + RECOVERY_TIMEOUT_S:
            child = self.stack.children().get(kill.name)
            try:
                addresses = {e.address for e in self.stack.stats().executors}
            except grpc.RpcError:
                addresses = set()
            if kill.name != "scheduler" and self.stack.executor_address(kill.name) \
                    not in addresses:
                gone = True
            if gone and child is not None and child.pid != kill.pid \
                    and len(addresses) == self.stack.executors:
                kill.back_s = time.monotonic() - kill.at
                return
            time.sleep(0.05)

    def _kill(self, name: str, share: float) -> None:
        try:
            stats = self.stack.stats()
        except grpc.RpcError as exc:
            self.missed.append(f"no scheduler stats before killing {name}: {exc.code()}")
            return
        if name == "scheduler":
            in_flight = stats.num_running + stats.num_waiting
        else:
            in_flight = sum(e.num_running for e in stats.executors
                            if e.address == self.stack.executor_address(name))
        victim = self.stack.children().get(name)
        if victim is None:
            self.missed.append(f"no live {name} to kill")
            return
        victim.kill()  # SIGKILL
        self.kills.append(Kill(name, victim.pid, time.monotonic(), in_flight, share))

    def recovered(self, timeout: float = RECOVERY_TIMEOUT_S) -> list[str]:
        """Waits for every killed child to run again under a new pid, and every executor to be
        registered with the scheduler; what did not come back."""
        deadline = time.monotonic() + timeout
        while True:
            children = self.stack.children()
            back = all(k.name in children and children[k.name].pid != k.pid
                       for k in self.kills)
            try:
                registered = len(self.stack.stats().executors) == self.stack.executors
            except grpc.RpcError:
                registered = False
            if back and registered:
                return []
            if time.monotonic() > deadline or self.stack.process.poll() is not None:
                return [f"after the kills: {sorted(children)} running under `up` (exited: "
                        f"{self.stack.process.poll()}), all executors registered: "
                        f"{registered}"]
            time.sleep(0.2)


def longest_pause(outcomes: list[Outcome], at: float, until: float) -> tuple[float, int]:
    """The longest pause a client saw during a restart: over the streams spanning `at` (events
    before and after it), the largest gap between consecutive events that begins between the
    stream's last event before `at` and `until` (the next kill, or the end of the round), cut
    at `until`; and the number of streams spanning `at`."""
    pauses, spanning = [], 0
    for outcome in outcomes:
        times = outcome.arrivals
        last = max((k for k, t in enumerate(times) if t <= at), default=None)
        if last is None or last == len(times) - 1:
            continue
        spanning += 1
        pauses += [min(times[k + 1], until) - times[k] for k in range(last, len(times) - 1)
                   if times[k] < until]
    return max(pauses, default=0.0), spanning


def differences(reference: list[Outcome], replay: list[Outcome],
                plans: list[ClientPlan]) -> list[tuple[int, str]]:
    """(client index, why) for each stream of `replay` whose text is not the reference's:
    equal for streams read to the end, one a prefix of the other where a client hung up."""
    found = []
    for i, (ref, got, plan) in enumerate(zip(reference, replay, plans, strict=True)):
        if ref.error or got.error or ref.status != 200 or got.status != 200:
            continue  # counted as failures elsewhere
        same = ref.text == got.text if plan.drop_after is None else (
            ref.text.startswith(got.text) or got.text.startswith(ref.text))
        if not same:
            kind = "greedy" if plan.seed is None else f"seed {plan.seed}"
            found.append((i, f"client {i} ({kind}): {got.text[:60]!r}... != "
                             f"{ref.text[:60]!r}..."))
    return found


# -- the report --------------------------------------------------------------------------

@dataclass
class RoundReport:
    outcomes: list[Outcome]
    wall_s: float
    leaked_blocks: int  # blocks not free once idle, over every executor
    total_blocks: int
    registered: int  # executors registered once idle
    snapshot: dict[str, Snapshot]
    chaos: Chaos | None = None

    @property
    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and not o.dropped and not o.error]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200 or o.error or o.malformed]

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


def failures(start: dict[str, Snapshot], rounds: list[RoundReport], fd_slack: int,
             executors: int, rss_from: int = 1) -> list[str]:
    """What the rounds got wrong; RSS is compared over the last three rounds from round
    `rss_from` on."""
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
        if report.leaked_blocks:
            found.append(f"round {number}: {report.leaked_blocks} KV blocks leaked")
        if report.registered != executors:
            found.append(f"round {number}: {report.registered} of {executors} executors "
                         "registered once idle")
    last = rounds[-1].snapshot
    for name, before in start.items():
        after = last.get(name)
        if after is None:
            found.append(f"{name}: not running after the last round")
            continue
        if after.pid != before.pid:
            continue  # restarted: its counts start over; restarted() reports it
        if after.fds > before.fds + fd_slack or after.tasks > before.tasks + fd_slack:
            found.append(f"{name}: {before.fds} -> {after.fds} fds, {before.tasks} -> "
                         f"{after.tasks} tasks")
        # A leak grows: the last round above the lowest of the last rounds. RSS that falls
        # (the allocator returning memory after the warm-up) is not one. Rounds before the
        # process last started are left out.
        rss = [r.snapshot[name].rss_mib for r in rounds[max(rss_from - 1, len(rounds) - 3):]
               if name in r.snapshot and r.snapshot[name].pid == after.pid]
        if rss[-1] > min(rss) * (1 + RSS_TOLERANCE):
            found.append(f"{name}: RSS grew over the last rounds: "
                         f"{', '.join(f'{v:.1f}' for v in rss)} MiB")
    return found


def restarted(start: dict[str, Snapshot], rounds: list[RoundReport]) -> list[str]:
    last = rounds[-1].snapshot
    return [name for name, before in start.items()
            if name in last and last[name].pid != before.pid]


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


def chaos_report(rounds: list[RoundReport], plans: list[ClientPlan]) -> tuple[list[str],
                                                                                list[str]]:
    """Lines on the chaos round and the rounds after it, and the failures among them."""
    reference, chaos = rounds[0], rounds[CHAOS_ROUND - 1]
    lines, found = [], []
    kills = chaos.chaos.kills
    for k, kill in enumerate(kills):
        until = kills[k + 1].at if k + 1 < len(kills) else float("inf")
        pause, spanning = longest_pause(chaos.outcomes, kill.at, until)
        what = "sequences running on it" if kill.name != "scheduler" else \
            "requests running or waiting"
        lines.append(f"chaos kill: {kill.name} (pid {kill.pid}) SIGKILL "
                     f"{kill.at - chaos.chaos.started:.1f} s into the round, at "
                     f"{kill.progress:.0%} of its events, {kill.in_flight} {what}; longest "
                     f"pause a client saw across it {pause:.2f} s ({spanning} streams "
                     "spanning it); back (registered) "
                     f"{'never' if kill.back_s is None else f'after {kill.back_s:.1f} s'}")
        if not kill.in_flight:
            found.append(f"the {kill.name} kill landed with nothing in flight")
    greedy = [i for i, p in enumerate(plans) if p.seed is None and p.drop_after is None]
    seeded = [i for i, p in enumerate(plans) if p.seed is not None and p.drop_after is None]
    for number, report in enumerate(rounds[1:], 2):
        diff = dict(differences(reference.outcomes, report.outcomes, plans))
        label = "chaos" if number == CHAOS_ROUND else "after"
        lines.append(
            f"chaos round {number} ({label}): sent {len(report.outcomes)}, completed "
            f"{len(report.completed)}, dropped by their clients "
            f"{sum(o.dropped for o in report.outcomes)}, failed {len(report.failed)}; tokens "
            f"identical to round 1: greedy {sum(i not in diff for i in greedy)}/{len(greedy)}, "
            f"seeded {sum(i not in diff for i in seeded)}/{len(seeded)}, hung-up prefixes "
            f"{sum(i not in diff for i in range(len(plans)) if plans[i].drop_after)}/"
            f"{sum(bool(p.drop_after) for p in plans)}; blocks leaked {report.leaked_blocks}")
        if diff:
            found.append(f"round {number}: {len(diff)} streams differ from round 1, e.g. "
                         f"{next(iter(diff.values()))}")
    return lines, found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    chaos_found: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pagedserve-soak-") as tmp:
        model = args.model
        if model is None:
            from pagedserve.testing.tiny_models import save_tiny_llama
            model = str(save_tiny_llama(pathlib.Path(tmp) / "tiny-llama"))
        log_path = pathlib.Path(tmp) / "stack.log"
        stack = start_stack(model, args.kv_cache_gib, args.executors, log_path)
        try:
            # A full round first: the prefix cache, allocator arenas and connection pools
            # reach their working size before anything is counted.
            warm = plan_clients(args.clients, args.disconnect_fraction, rng)
            asyncio.run(run_round(stack.base, warm, rng.randrange(2**32), args.timeout))
            stack.wait_idle()
            time.sleep(1)  # let closed connections settle before counting
            start = stack.snapshot()
            print(f"{args.clients} clients x {args.rounds} rounds, "
                  f"{args.disconnect_fraction:.0%} disconnecting, {args.executors} executors"
                  f"{'; chaos in round ' + str(CHAOS_ROUND) if args.chaos else ''}; "
                  f"model {model}")
            print("| round | completed | dropped | req/s | TTFT p50 s | TTFT p99 s | statuses "
                  "| after the round |\n|---|---|---|---|---|---|---|---|")
            rounds = []
            replay = plan_clients(args.clients, args.disconnect_fraction, rng, replayed=True)
            replay_seed = rng.randrange(2**32)
            for number in range(1, args.rounds + 1):
                chaos = None
                if args.chaos:
                    plans, seed = replay, replay_seed
                    if number == CHAOS_ROUND:
                        chaos = Chaos(stack, args.kill_executor_at, args.kill_scheduler_at)
                else:
                    plans = plan_clients(args.clients, args.disconnect_fraction, rng)
                    seed = rng.randrange(2**32)
                outcomes, wall_s = asyncio.run(run_round(stack.base, plans, seed,
                                                         args.timeout, chaos))
                if chaos is not None:
                    chaos_found += chaos.missed + chaos.recovered()
                stats = stack.wait_idle(RECOVERY_TIMEOUT_S if chaos else 60)
                time.sleep(1)
                rounds.append(RoundReport(
                    outcomes, wall_s,
                    sum(e.total_blocks - e.free_blocks for e in stats.executors),
                    sum(e.total_blocks for e in stats.executors), len(stats.executors),
                    stack.snapshot(), chaos))
                print(rounds[-1].line(number), flush=True)
            if args.chaos and stack.process.poll() is not None:
                chaos_found.append(f"`up` exited with status {stack.process.returncode}")
        finally:
            stop_stack(stack)
    print(summary(rounds))
    print("before the rounds: " + ", ".join(
        f"{name} {s.fds} fds / {s.tasks} tasks / {s.rss_mib:.0f} MiB"
        for name, s in start.items()) + f"; KV blocks: {rounds[0].total_blocks} in all, "
        f"{rounds[-1].leaked_blocks} held once idle after the last round")
    gone = restarted(start, rounds)
    if gone:
        print(f"restarted (new pid; fds, tasks and RSS not compared): {', '.join(gone)}; "
              f"compared: {', '.join(n for n in start if n not in gone)}")
    # With --chaos, RSS from the chaos round on: while executor 0 is away, the other one
    # carries every request and its working set grows to that load once.
    rss_from = CHAOS_ROUND if args.chaos else 1
    found = failures(start, rounds, args.fd_slack, args.executors, rss_from)
    if args.chaos:
        lines, more = chaos_report(rounds, replay)
        for line in lines:
            print(line)
        found += chaos_found + more
    for failure in found:
        print(f"FAILED: {failure}")
    print("PASSED" if not found else f"{len(found)} checks FAILED")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
