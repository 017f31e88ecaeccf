"""The step loop of one executor: plan, send, receive, apply, forever (docs/design.md §2, §4).

Overlapped, the plan of step N+1 goes out before the result of step N comes back (at most two
plans in flight), so the result's and the plan's trips, applying the result and planning hide
behind the executor's forward pass. That has a price: a request that arrives while step N runs
joins step N + 2, not N + 1, which is already planned, so its first token comes a step later.
It pays where that overhead is a large share of a step (a GPU's steps of a few milliseconds),
not where steps take tens of milliseconds (a CPU's: there it costs a quarter of TTFT and buys
no throughput, docs/performance.md). So by default (`Overlap.AUTO`) the loop measures both:
the executor's step time (the `execute_seconds` each result reports) and, on steps it does not
overlap, what each costs beyond it; it overlaps while that overhead exceeds
OVERLAP_OVERHEAD_SHARE of a step, and while overlapping runs one step in
OVERLAP_PROBE_STEPS alone to measure the overhead again. ALWAYS and NEVER fix the choice (the
offline engine and tests; `--no-overlap`).

A step watchdog bounds each step: a result that does not come within `step_timeout_s`, scaled
up with the step's share of the token budget, from when its plan went out marks the executor
lost as wedged (a hung GPU keeps heartbeating from its event loop, so only the step loop can
tell). Requests the executor refuses fail alone; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pagedserve.scheduler.executor_handle import ExecutorHandle, ExecutorLost
from pagedserve.scheduler.step_scheduler import StepScheduler

log = structlog.get_logger(__name__)


# AUTO overlaps while the overhead a step pays without overlap exceeds this share of the
# executor's step time. Below it overlap buys little and costs every new request a step of
# waiting. On the project's 2-core CPU machine the overhead measured 2.5-4.4 ms against steps
# of 22-100 ms (4-11 %), and overlap bought no throughput or ITL at either end: there the
# overhead is CPU time that the executor's threads lose to the other services either way
# (docs/performance.md). A GPU running a small model spends most of a step on it.
OVERLAP_OVERHEAD_SHARE = 0.20
# AUTO, while overlapping: one step in this many runs alone, to measure the overhead again.
OVERLAP_PROBE_STEPS = 256
# Weight of each new measurement in the moving averages AUTO decides on.
COST_AVERAGING = 0.2


class StepTimedOut(ExecutorLost):
    """A step ran past its bound: the executor is alive but stuck."""


class Overlap(enum.Enum):
    """Whether the plan of step N+1 goes out before step N's result is in (module docstring)."""

    NEVER = "never"
    AUTO = "auto"  # while it pays, as measured
    ALWAYS = "always"


@dataclass
class StepCosts:
    """What Overlap.AUTO decides on: moving averages of the executor's step time and of what a
    step costs beyond it when not overlapped (both None until measured)."""

    step_s: float | None = None
    overhead_s: float | None = None
    # Steps sent while another was in flight since the overhead was last measured.
    overlapped_steps: int = 0

    def observe_step(self, execute_s: float) -> None:
        self.step_s = _averaged(self.step_s, execute_s)

    def observe_overhead(self, overhead_s: float) -> None:
        self.overhead_s = _averaged(self.overhead_s, overhead_s)
        self.overlapped_steps = 0

    def overlap_pays(self) -> bool:
        """Whether to overlap the next step: not before both are measured (the first steps
        run alone, which measures them), nor when a probe is due."""
        if self.step_s is None or self.overhead_s is None \
                or self.overlapped_steps >= OVERLAP_PROBE_STEPS:
            return False
        return self.overhead_s > OVERLAP_OVERHEAD_SHARE * self.step_s


def _averaged(average: float | None, value: float) -> float:
    return value if average is None else average + COST_AVERAGING * (value - average)


@dataclass
class _InFlight:
    """A plan sent and not yet answered."""

    deadline: float | None  # time.monotonic() by which it must be answered (None: no bound)
    sent_at: float
    # Seconds from the previous result to this plan's send (applying it, planning), where this
    # plan went out alone right after it; None otherwise.
    turnaround_s: float | None
    alone: bool = True  # no other plan in flight while it was


@dataclass(frozen=True)
class LoopEvents:
    """What the loop reports to the cluster."""

    # The executor is lost (its stream broke, it drained, or it wedged): the reason, and
    # whether it wedged.
    on_lost: Callable[[str, bool], None]
    # The executor refused a request's part of a plan: (request id, reason).
    on_refused: Callable[[str, str], None]


def failures_into(failures: list[str], failed: asyncio.Event | None = None) -> LoopEvents:
    """Events that record every failure in `failures`, and set `failed` (one in-process
    executor: the caller raises on the first; a refused request ends no loop, so a caller
    waiting for its output needs the event to wake)."""
    def record(failure: str) -> None:
        failures.append(failure)
        if failed is not None:
            failed.set()

    return LoopEvents(on_lost=lambda reason, wedged: record(reason),
                      on_refused=lambda request_id, reason: record(
                          f"the executor refused request {request_id}: {reason}"))


class PoolLoop:
    def __init__(self, scheduler: StepScheduler, handle: ExecutorHandle, overlap: Overlap,
                 events: LoopEvents, step_timeout_s: float | None = None):
        """`step_timeout_s`: the watchdog's base bound; None: none (an in-process executor,
        whose failures raise)."""
        self.scheduler = scheduler
        self.handle = handle
        self.overlap = overlap
        self.costs = StepCosts()
        self._overlapping = False  # AUTO's last choice
        self.events = events
        self.step_timeout_s = step_timeout_s
        # The plans in flight, oldest first.
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        # When the last result was applied, while the loop has not idled since.
        self._applied_at: float | None = None
        self.last_progress = time.monotonic()
        # Time the loop spent waiting for a result with no other plan in flight (the
        # executor may have been idle for part of it): the overlap benchmark reads it.
        self.wait_seconds = 0.0
        self._wakeup = asyncio.Event()

    def seconds_since_progress(self) -> float:
        """Since the last result, or 0 while there is nothing to wait for (an idle executor
        is not a wedged one)."""
        if not self.scheduler.has_work:
            return 0.0
        return time.monotonic() - self.last_progress

    def notify(self) -> None:
        """New work (a request, an abort): plan again even if the loop is idle."""
        self._wakeup.set()

    def _max_in_flight(self) -> int:
        if self.overlap is not Overlap.AUTO:
            return 2 if self.overlap is Overlap.ALWAYS else 1
        overlapping = self.costs.overlap_pays()
        if overlapping != self._overlapping and self.costs.overhead_s is not None:
            log.debug("step overlap", overlapping=overlapping,
                      step_ms=round(1000 * self.costs.step_s, 2),
                      overhead_ms=round(1000 * self.costs.overhead_s, 2))
        self._overlapping = overlapping
        return 2 if overlapping else 1

    async def run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                max_in_flight = self._max_in_flight()
                plan = (self.scheduler.schedule() if len(self._in_flight) < max_in_flight
                        else None)
                if plan is not None:
                    await self._send(plan)
                    if len(self._in_flight) < max_in_flight:
                        continue  # overlap: plan the next step before waiting
                if self._in_flight:
                    started = time.monotonic()
                    result = await self._receive()
                    self.wait_seconds += time.monotonic() - started
                    self.last_progress = time.monotonic()
                    if result.error:
                        # The executor and this scheduler disagree about state: a bug. Its
                        # requests are safest recomputed from scratch.
                        raise ExecutorLost(f"executor rejected step {result.step_id}: "
                                           f"{result.error}")
                    for request_id, reason in self.scheduler.process(result).items():
                        self.events.on_refused(request_id, reason)
                    self._applied_at = time.monotonic()
                else:
                    self._applied_at = None  # idle time is no step's overhead
                    await self._wakeup.wait()  # nothing to plan and nothing in flight
                    self.last_progress = time.monotonic()  # idle time is not a stall
        except ExecutorLost as exc:
            log.warning("executor lost", error=str(exc))
            self.events.on_lost(str(exc), isinstance(exc, StepTimedOut))

    def _deadline(self, plan) -> float | None:
        """When the executor must have answered `plan`: the base bound from now, plus as much
        again for a step that fills the whole token budget."""
        if self.step_timeout_s is None:
            return None
        tokens = sum(work.num_tokens for work in plan.work)
        share = tokens / self.scheduler.limits.max_num_batched_tokens
        return time.monotonic() + self.step_timeout_s * (1 + share)

    async def _send(self, plan) -> None:
        now = time.monotonic()
        alone = not self._in_flight
        for earlier in self._in_flight:
            earlier.alone = False
        if not alone:
            self.costs.overlapped_steps += 1
        turnaround = now - self._applied_at if alone and self._applied_at is not None else None
        await self.handle.send(plan)
        self._in_flight.append(_InFlight(self._deadline(plan), now, turnaround, alone))

    async def _receive(self):
        sent = self._in_flight[0]
        if sent.deadline is None:
            result = await self.handle.receive()
        else:
            try:
                result = await asyncio.wait_for(self.handle.receive(),
                                                max(0.0, sent.deadline - time.monotonic()))
            except TimeoutError:
                raise StepTimedOut(f"a step ran past its bound of {self.step_timeout_s:.0f} s "
                                   "(scaled by its size): the executor is wedged") from None
        self._in_flight.popleft()
        self._measure(sent, result.execute_seconds)
        return result

    def _measure(self, sent: _InFlight, execute_s: float) -> None:
        """The step's time, and, for a step that ran alone right after the previous result,
        what it cost beyond it: the round trip less the executor's step, and the turnaround
        before it. An executor's figure is checked: it only steers this choice."""
        if not (math.isfinite(execute_s) and execute_s >= 0):
            return
        self.costs.observe_step(execute_s)
        if sent.alone and sent.turnaround_s is not None:
            round_trip = time.monotonic() - sent.sent_at
            self.costs.observe_overhead(max(0.0, round_trip - execute_s) + sent.turnaround_s)
