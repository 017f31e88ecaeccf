"""The gateway's /ready (issue 17): it says whether this gateway can serve. One wedged executor
must not take every gateway out of its Service (a readiness probe failing on all of them turns
one stuck GPU into an outage); no executor progressing, or none registered, does."""

import asyncio
import json

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.http_api import STALL_S, ready
from pagedserve.v1 import scheduler_pb2


class FakeScheduler:
    def __init__(self, *seconds_since_progress: float, down: bool = False):
        self.down = down
        self.reply = scheduler_pb2.SchedulerStats(executors=[
            scheduler_pb2.ExecutorStats(executor_id=f"e{i}", seconds_since_progress=s)
            for i, s in enumerate(seconds_since_progress)])

    async def stats(self, timeout: float) -> scheduler_pb2.SchedulerStats:
        if self.down:
            raise GatewayError(503, "the scheduler is unreachable", "service_unavailable")
        return self.reply


def answer(scheduler: FakeScheduler) -> tuple[int, dict]:
    reply = asyncio.run(ready(scheduler))
    if isinstance(reply, dict):
        return 200, reply
    return reply.status_code, json.loads(reply.body)


def test_one_wedged_executor_leaves_the_gateway_ready_and_named():
    status, body = answer(FakeScheduler(0.0, STALL_S + 1))
    assert status == 200 and body["executors"] == 1 and body["stalled_executors"] == ["e1"]


def test_no_executor_progressing_or_registered_or_no_scheduler_is_unready():
    for scheduler in (FakeScheduler(STALL_S + 1, STALL_S + 5), FakeScheduler(),
                      FakeScheduler(0.0, down=True)):
        status, body = answer(scheduler)
        assert status == 503 and body["error"]["type"] == "service_unavailable", body
