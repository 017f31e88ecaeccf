"""The step loop of one executor: plan, send, receive, apply, forever (docs/design.md §2, §4).

With overlap on, the plan of step N+1 goes out before the result of step N comes back (at most
two plans in flight), so planning and the RPC hide behind the executor's forward pass.

A step watchdog bounds each step: a result that does not come within `step_timeout_s`, scaled
up with the step's share of the token budget, from when its plan went out marks the executor
lost as wedged (a hung GPU keeps heartbeating from its event loop, so only the step loop can
tell). Requests the executor refuses fail alone; the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from pagedserve.scheduler.executor_handle import ExecutorHandle, ExecutorLost
from pagedserve.scheduler.step_scheduler import StepScheduler

log = structlog.get_logger(__name__)


class StepTimedOut(ExecutorLost):
    """A step ran past its bound: the executor is alive but stuck."""


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
    def __init__(self, scheduler: StepScheduler, handle: ExecutorHandle, overlap: bool,
                 events: LoopEvents, step_timeout_s: float | None = None):
        """`step_timeout_s`: the watchdog's base bound; None: none (an in-process executor,
        whose failures raise)."""
        self.scheduler = scheduler
        self.handle = handle
        self.overlap = overlap
        self.events = events
        self.step_timeout_s = step_timeout_s
        # time.monotonic() by which each plan in flight must be answered (None: no bound),
        # oldest first
        self._deadlines: collections.deque[float | None] = collections.deque()
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

    async def run(self) -> None:
        in_flight = 0
        max_in_flight = 2 if self.overlap else 1
        try:
            while True:
                self._wakeup.clear()
                plan = self.scheduler.schedule() if in_flight < max_in_flight else None
                if plan is not None:
                    await self.handle.send(plan)
                    self._deadlines.append(self._deadline(plan))
                    in_flight += 1
                    if in_flight < max_in_flight:
                        continue  # overlap: plan the next step before waiting
                if in_flight:
                    started = time.monotonic()
                    result = await self._receive()
                    self.wait_seconds += time.monotonic() - started
                    in_flight -= 1
                    self.last_progress = time.monotonic()
                    if result.error:
                        # The executor and this scheduler disagree about state: a bug. Its
                        # requests are safest recomputed from scratch.
                        raise ExecutorLost(f"executor rejected step {result.step_id}: "
                                           f"{result.error}")
                    for request_id, reason in self.scheduler.process(result).items():
                        self.events.on_refused(request_id, reason)
                else:
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

    async def _receive(self):
        deadline = self._deadlines.popleft()
        if deadline is None:
            return await self.handle.receive()
        try:
            return await asyncio.wait_for(self.handle.receive(),
                                          max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise StepTimedOut(f"a step ran past its bound of {self.step_timeout_s:.0f} s "
                                 "(scaled by its size): the executor is wedged") from None
