"""The step loop's choice to overlap steps (scheduler pool_loop.py): Overlap.AUTO overlaps
where the overhead a step pays beyond the executor's forward pass is a large share of a step,
not where steps are long, measures that overhead again while overlapping, and ignores step
times no executor could report; ALWAYS and NEVER fix the choice."""

import asyncio
import math

import pytest

from pagedserve.scheduler import pool_loop
from pagedserve.scheduler.pool_loop import Overlap, PoolLoop, StepCosts, failures_into
from pagedserve.v1 import executor_pb2


class _Limits:
    max_num_batched_tokens = 16


class FakeScheduler:
    """Plans `steps` one-token steps, then nothing."""

    limits = _Limits()

    def __init__(self, steps: int):
        self.left = steps
        self.processed = 0

    def schedule(self):
        if not self.left:
            return None
        self.left -= 1
        plan = executor_pb2.StepPlan(step_id=self.left)
        plan.work.add(request_id="r", num_tokens=1)
        return plan

    def process(self, result):
        self.processed += 1
        return {}

    @property
    def has_work(self) -> bool:
        return bool(self.left)


class FakeExecutor:
    """Answers each plan after `round_trip_s`, reporting `execute_s` as its step time; records
    how many plans were in flight as each went out."""

    def __init__(self, round_trip_s: float, execute_s: float):
        self.round_trip_s, self.execute_s = round_trip_s, execute_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.in_flight = 0
        self.in_flight_at_send: list[int] = []

    async def send(self, plan):
        self.in_flight += 1
        self.in_flight_at_send.append(self.in_flight)
        self.queue.put_nowait(plan)

    async def receive(self):
        plan = await self.queue.get()
        await asyncio.sleep(self.round_trip_s)
        self.in_flight -= 1
        return executor_pb2.StepResult(step_id=plan.step_id, execute_seconds=self.execute_s)


def run_loop(overlap: Overlap, steps: int, round_trip_s: float, execute_s: float):
    scheduler, executor = FakeScheduler(steps), FakeExecutor(round_trip_s, execute_s)
    loop = PoolLoop(scheduler, executor, overlap, failures_into([]))

    async def main():
        task = asyncio.create_task(loop.run())
        while scheduler.processed < steps:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    return loop, executor.in_flight_at_send


def test_auto_overlaps_where_the_overhead_is_a_large_share_of_a_step():
    # Steps the executor says took 0.1 ms, answered after 2 ms: overhead is nearly all of it.
    loop, in_flight = run_loop(Overlap.AUTO, 20, round_trip_s=0.002, execute_s=0.0001)
    assert in_flight[0] == 1  # the first step measures: it goes alone
    assert in_flight.count(2) >= 15
    assert loop.costs.overhead_s > 0.001 and loop.costs.step_s == pytest.approx(0.0001)


def test_auto_does_not_overlap_long_steps():
    # Steps of 1 s (as reported) answered after 2 ms: the overhead is well under 20 % of a step.
    loop, in_flight = run_loop(Overlap.AUTO, 20, round_trip_s=0.002, execute_s=1.0)
    assert in_flight == [1] * 20
    assert loop.costs.overhead_s < pool_loop.OVERLAP_OVERHEAD_SHARE * loop.costs.step_s


def test_auto_measures_the_overhead_again_while_it_overlaps(monkeypatch):
    monkeypatch.setattr(pool_loop, "OVERLAP_PROBE_STEPS", 4)
    _, in_flight = run_loop(Overlap.AUTO, 40, round_trip_s=0.002, execute_s=0.0001)
    # After the first step, each run of overlapped steps is cut by a step sent alone.
    runs = "".join(map(str, in_flight[1:])).split("1")
    assert len(runs) >= 5 and max(len(run) for run in runs) <= 4


@pytest.mark.parametrize("overlap, expected", [(Overlap.ALWAYS, 2), (Overlap.NEVER, 1)])
def test_always_and_never_fix_the_choice(overlap, expected):
    # ALWAYS overlaps steps that AUTO would not, NEVER steps that AUTO would.
    execute_s = 1.0 if overlap is Overlap.ALWAYS else 0.0001
    _, in_flight = run_loop(overlap, 10, round_trip_s=0.002, execute_s=execute_s)
    assert max(in_flight) == expected and in_flight.count(expected) >= 8


@pytest.mark.parametrize("reported", [math.nan, math.inf, -1.0])
def test_a_step_time_no_executor_could_report_is_ignored(reported):
    loop, in_flight = run_loop(Overlap.AUTO, 5, round_trip_s=0.001, execute_s=reported)
    assert loop.costs.step_s is None and loop.costs.overhead_s is None
    assert in_flight == [1] * 5  # nothing measured: nothing overlaps


def test_the_decision_itself():
    costs = StepCosts()
    assert not costs.overlap_pays()  # nothing measured yet
    costs.observe_step(0.010)
    costs.observe_overhead(0.003)  # 30 % of a step
    assert costs.overlap_pays()
    for _ in range(30):
        costs.observe_step(0.030)  # 10 % of a step
    assert not costs.overlap_pays()
