"""The step loop of one executor: plan, send, receive, apply, forever (docs/design.md §2, §4).

With overlap on, the plan of step N+1 goes out before the result of step N comes back (at most
two plans in flight), so planning and the RPC hide behind the executor's forward pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from pagedserve.scheduler.executor_handle import ExecutorHandle, ExecutorLost
from pagedserve.scheduler.step_scheduler import StepScheduler

log = structlog.get_logger(__name__)


class PoolLoop:
    def __init__(self, scheduler: StepScheduler, handle: ExecutorHandle, overlap: bool,
                 on_lost: Callable[[str], None]):
        self.scheduler = scheduler
        self.handle = handle
        self.overlap = overlap
        self.on_lost = on_lost
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
                    in_flight += 1
                    if in_flight < max_in_flight:
                        continue  # overlap: plan the next step before waiting
                if in_flight:
                    started = time.monotonic()
                    result = await self.handle.receive()
                    self.wait_seconds += time.monotonic() - started
                    in_flight -= 1
                    self.last_progress = time.monotonic()
                    if result.error:
                        # The executor and this scheduler disagree about state: a bug. Its
                        # requests are safest recomputed from scratch.
                        raise ExecutorLost(f"executor rejected step {result.step_id}: "
                                           f"{result.error}")
                    self.scheduler.process(result)
                else:
                    await self._wakeup.wait()  # nothing to plan and nothing in flight
                    self.last_progress = time.monotonic()  # idle time is not a stall
        except ExecutorLost as exc:
            log.warning("executor lost", error=str(exc))
            self.on_lost(str(exc))
