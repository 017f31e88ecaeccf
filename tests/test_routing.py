"""Routing in the scheduler's cluster (scheduler_svc/pagedserve/scheduler/cluster.py): a
prefix-cache hit wins over room, and a burst of requests that arrives before any step has allocated
for them spreads over the executors by the room each has left; a sequence stopped while its request
waits for an executor (its own was lost) ends when the request is placed again."""

import asyncio

import pytest

from pagedserve.runtime.capacity import MAX_KV_BLOCKS
from pagedserve.scheduler.cluster import (
    MAX_EXECUTOR_LOSSES,
    Cluster,
    ClusterConfig,
    ExecutorWedged,
    RegistrationConflict,
    Submission,
)
from pagedserve.scheduler.executor_pool import DescriptionError
from pagedserve.v1 import common_pb2, executor_pb2, scheduler_pb2

BLOCK_SIZE = 4


class IdleHandle:
    """An executor that never answers: plans stay unsent, so no step allocates anything."""

    async def send(self, plan) -> None:
        await asyncio.Event().wait()

    async def receive(self):
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


def registration(executor_id: str, num_blocks: int,
                 session: str = "s") -> scheduler_pb2.RegisterExecutorRequest:
    return scheduler_pb2.RegisterExecutorRequest(
        executor_id=executor_id, address=f"{executor_id}:50053",
        session_token=f"{executor_id}-{session}".ljust(32, "x"),
        model=common_pb2.ModelInfo(model_id="m", max_model_len=64, vocab_size=100),
        kv_cache=common_pb2.KvCacheInfo(num_blocks=num_blocks, block_size=BLOCK_SIZE),
        limits=common_pb2.ExecutorLimits(max_num_seqs=8, max_num_batched_tokens=64))


def submission(request_id: str, prompt: list[int]) -> Submission:
    return Submission(request_id, prompt, common_pb2.SamplingParams(max_tokens=4), 0,
                      emit=lambda delta: None)


def run(test) -> None:
    async def main():
        cluster = Cluster(ClusterConfig(), make_handle=lambda address, session: IdleHandle())
        try:
            await test(cluster)
        finally:
            for pool in cluster.pools.values():
                pool.task.cancel()
    asyncio.run(main())


# Pools (name, blocks), in registration order; requests of 2 blocks each, all submitted before
# any step; how many each pool gets.
@pytest.mark.parametrize("pools, requests, expected", [
    ([("a", 40), ("b", 40)], 6, {"a": 3, "b": 3}),
    # large takes 5 until its unclaimed room is down to small's 20, then they alternate
    ([("small", 20), ("large", 30)], 8, {"small": 2, "large": 6}),
])
def test_a_burst_spreads_by_unclaimed_room(pools, requests, expected):
    async def test(cluster):
        for name, num_blocks in pools:
            cluster.register(registration(name, num_blocks))
        for i in range(requests):
            cluster.submit("m", submission(f"r{i}", list(range(10 * i, 10 * i + 8))),
                           fail=lambda code, message: None)
        placed = [cluster.placement[f"r{i}"].executor_id for i in range(requests)]
        assert {name: placed.count(name) for name, _ in pools} == expected
    run(test)


def test_a_prefix_hit_wins_over_room():
    async def test(cluster):
        cluster.register(registration("roomy", 40))
        cluster.register(registration("cached", 20))
        prefix = list(range(50, 58))  # two full blocks
        blocks = cluster.pools["cached"].scheduler.blocks
        blocks.admit("earlier", prefix)
        blocks.allocate("earlier", len(prefix))
        blocks.commit("earlier", prefix, len(prefix))
        blocks.free("earlier")  # cached-free: still indexed
        cluster.submit("m", submission("hit", prefix + [1, 2]), fail=lambda code, message: None)
        cluster.submit("m", submission("miss", [3, 4, 5, 6, 7]), fail=lambda code, message: None)
        assert cluster.placement["hit"].executor_id == "cached"
        assert cluster.placement["miss"].executor_id == "roomy"
    run(test)


def test_unclaimed_room_follows_the_queue():
    """The room routing reads is the free blocks less what each waiting request needs to
    start, counted independently here as the queue grows and shrinks."""
    async def test(cluster):
        cluster.register(registration("a", 40))
        scheduler = cluster.pools["a"].scheduler
        prompts = {f"r{i}": list(range(9 + 4 * i)) for i in range(4)}  # 9, 13, 17, 21 tokens
        for request_id, prompt in prompts.items():
            cluster.submit("m", submission(request_id, prompt), fail=lambda code, message: None)

        def expected() -> int:
            return 40 - sum(-(-len(prompts[r]) // BLOCK_SIZE) for r in prompts)
        assert scheduler.num_unclaimed_free_blocks == expected() == 40 - (3 + 4 + 5 + 6)
        cluster.finished("r1")  # aborted while waiting
        del prompts["r1"]
        assert scheduler.num_unclaimed_free_blocks == expected()
        scheduler.take_all()  # its executor was lost
        assert scheduler.num_unclaimed_free_blocks == 40
    run(test)


def test_a_sequence_stopped_while_its_request_waits_is_not_recomputed():
    async def test(cluster):
        cluster.register(registration("a", 40))
        deltas = []
        cluster.submit("m", Submission("r", list(range(8)),
                                       common_pb2.SamplingParams(max_tokens=4), 0,
                                       emit=deltas.append), fail=lambda code, message: None)
        cluster.pools["a"].lease_deadline = 0  # its heartbeats stopped: lost at the next check
        cluster.expire()
        assert [orphan.request_id for orphan in cluster.orphans] == ["r"]
        cluster.stop_sequence("r", 0)  # the gateway matched a stop string meanwhile
        cluster.register(registration("b", 40))
        scheduler = cluster.pools["b"].scheduler
        assert not cluster.orphans and not scheduler.has_work and "r" not in scheduler.requests
        assert [delta.finish_reason for delta in deltas] == [common_pb2.FINISH_REASON_STOP]
    run(test)


@pytest.mark.parametrize("field, change, named", [
    ("num_blocks", lambda r: setattr(r.kv_cache, "num_blocks", 2**32 - 1), "kv_cache.num_blocks"),
    ("num_blocks", lambda r: setattr(r.kv_cache, "num_blocks", 0), "kv_cache.num_blocks"),
    ("block_size", lambda r: setattr(r.kv_cache, "block_size", 1 << 20), "kv_cache.block_size"),
    ("max_model_len", lambda r: setattr(r.model, "max_model_len", 2**32 - 1),
     "model.max_model_len"),
    ("vocab_size", lambda r: setattr(r.model, "vocab_size", 0), "model.vocab_size"),
    ("max_num_seqs", lambda r: setattr(r.limits, "max_num_seqs", 2**31), "limits.max_num_seqs"),
    ("max_logprobs", lambda r: setattr(r.limits, "max_logprobs", 101), "limits.max_logprobs"),
    ("eos", lambda r: r.model.eos_token_ids.append(100), "model.eos_token_ids"),
    ("executor_id", lambda r: setattr(r, "executor_id", "a\n" + "x" * 200), "executor_id"),
    ("address", lambda r: setattr(r, "address", "169.254.169.254"), "address"),
    ("address", lambda r: setattr(r, "address", "a:99999"), "address"),
    ("address", lambda r: setattr(r, "address", "a/b:1"), "address"),
    ("session_token", lambda r: setattr(r, "session_token", "short"), "session_token"),
    # Labels of /metrics: short plain tokens only.
    ("quantization", lambda r: setattr(r.model, "quantization", 'int8"} 1\nfake'),
     "model.quantization"),
    ("kv dtype", lambda r: setattr(r.kv_cache, "dtype", "x" * 33), "kv_cache.dtype"),
    # Memory sizes reach the stats' uint64 product total_blocks x bytes_per_block.
    ("bytes per block", lambda r: setattr(r.kv_cache, "bytes_per_block", 2**63),
     "kv_cache.bytes_per_block"),
    ("weight bytes", lambda r: setattr(r.model, "weight_bytes", 2**63), "model.weight_bytes"),
    ("sliding window", lambda r: setattr(r.kv_cache, "sliding_window", 2**32 - 1),
     "kv_cache.sliding_window"),
])
def test_a_registration_out_of_range_is_refused_and_evicts_nothing(field, change, named):
    """An executor's registration sizes the scheduler's structures: a value past its ceiling
    is refused by name, at once, and the executor already registered under that id stays."""
    async def test(cluster):
        cluster.register(registration("a", 40))
        bad = registration("a", 40)
        change(bad)
        with pytest.raises(DescriptionError, match=named.replace(".", r"\.")):
            cluster.register(bad)
        assert cluster.pools["a"].limits.num_blocks == 40
    run(test)


def test_an_executor_sizes_its_pool_to_what_the_scheduler_accepts():
    """The executor side of the ceiling: a pool that could hold more blocks holds the most a
    registration may carry, so a small model with a large KV budget still registers."""
    from pagedserve.executor.kv_cache import check_capacity

    assert check_capacity(MAX_KV_BLOCKS + 5, 16, 64) == MAX_KV_BLOCKS
    assert check_capacity(100, 16, 64) == 100
    capped = registration("a", check_capacity(10 * MAX_KV_BLOCKS, 16, 64))

    async def test(cluster):
        cluster.register(capped)
        assert cluster.pools["a"].limits.num_blocks == MAX_KV_BLOCKS
    run(test)


def test_an_id_held_by_another_session_is_refused_and_its_heartbeats_renew_nothing():
    """An impostor registering a live executor's id (ids are public in /metrics) gets
    ALREADY_EXISTS, not the executor's prompts; its heartbeats, which lack the session token,
    keep nothing alive. The holder itself may register again (a reply it lost)."""
    async def test(cluster):
        cluster.register(registration("a", 40, session="real"))
        real = cluster.pools["a"]
        with pytest.raises(RegistrationConflict, match="another session"):
            cluster.register(registration("a", 40, session="impostor"))
        assert cluster.pools["a"] is real
        impostor_token = registration("a", 40, session="impostor").session_token
        lease = real.lease_deadline
        assert not cluster.heartbeat("a", impostor_token)
        assert real.lease_deadline == lease
        assert cluster.heartbeat("a", real.registration.session_token)
        assert real.lease_deadline > lease
        cluster.register(registration("a", 40, session="real"))
        assert cluster.pools["a"] is not real
    run(test)


class HungHandle:
    """An executor that takes plans and never answers one: a wedged step."""

    def __init__(self):
        self.plans = []

    async def send(self, plan) -> None:
        self.plans.append(plan)

    async def receive(self):
        await asyncio.Event().wait()

    async def close(self) -> None:
        pass


class RefusingHandle(HungHandle):
    """Answers each plan at once, refusing request "bad" and sampling token 7 for the rest."""

    def __init__(self):
        super().__init__()
        self.results = asyncio.Queue()

    async def send(self, plan) -> None:
        await super().send(plan)
        samples = [w.request_id for w in plan.work if w.request_id != "bad"]
        self.results.put_nowait(executor_pb2.StepResult(
            step_id=plan.step_id,
            outputs=[executor_pb2.RequestOutput(request_id=r, token_ids=[7]) for r in samples],
            failed_requests=[executor_pb2.RequestFailure(request_id="bad", message="poison")]
            if any(w.request_id == "bad" for w in plan.work) else []))

    async def receive(self):
        return await self.results.get()


def test_a_refused_request_fails_alone_and_the_executor_stays():
    async def test():
        cluster = Cluster(ClusterConfig(), make_handle=lambda address, session: RefusingHandle())
        failures, deltas = {}, []
        cluster.register(registration("a", 40))
        for request_id in ("bad", "good"):
            cluster.submit("m", Submission(request_id, [1, 2, 3],
                                           common_pb2.SamplingParams(max_tokens=2), 0,
                                           emit=deltas.append),
                           fail=lambda code, message, r=request_id: failures.update(
                               {r: (code, message)}))
        for _ in range(100):
            await asyncio.sleep(0.01)
        assert failures == {"bad": ("INTERNAL", "the executor refused the request: poison")}
        assert [d.token_ids[:] for d in deltas] == [[7], [7]]  # "good" ran to max_tokens
        assert "a" in cluster.pools
        cluster.pools["a"].task.cancel()
    asyncio.run(test())


def test_a_wedged_executor_is_dropped_its_requests_move_and_it_may_not_return():
    """The step watchdog (a hung step, while heartbeats say the executor is alive)."""
    async def test():
        handles = {}
        cluster = Cluster(ClusterConfig(step_timeout_s=0.1), make_handle=lambda address,
                          session: handles.setdefault(address, HungHandle()))
        failures = []
        cluster.register(registration("a", 40))
        cluster.submit("m", submission("r", [1, 2, 3]),
                       fail=lambda code, message: failures.append((code, message)))
        for _ in range(100):
            if "a" not in cluster.pools:
                break
            await asyncio.sleep(0.01)
        assert "a" not in cluster.pools and [o.request_id for o in cluster.orphans] == ["r"]
        with pytest.raises(ExecutorWedged, match="restart it"):
            cluster.register(registration("a", 40, session="restarted"))
        cluster.register(registration("b", 40))
        assert cluster.placement["r"].executor_id == "b" and not failures
        for pool in cluster.pools.values():
            pool.task.cancel()
    asyncio.run(test())


def test_a_request_that_keeps_losing_executors_fails_saying_so():
    async def test():
        cluster = Cluster(ClusterConfig(step_timeout_s=0.05),
                          make_handle=lambda address, session: HungHandle())
        failures = []
        cluster.register(registration("e0", 40))
        cluster.submit("m", submission("r", [1, 2, 3]),
                       fail=lambda code, message: failures.append((code, message)))
        for i in range(1, MAX_EXECUTOR_LOSSES + 1):
            while f"e{i - 1}" in cluster.pools:
                await asyncio.sleep(0.01)
            cluster.register(registration(f"e{i}", 40))
        ((code, message),) = failures
        assert code == "INTERNAL" and f"lost {MAX_EXECUTOR_LOSSES} executors" in message
        assert "r" not in cluster.placement and not cluster.orphans
        for pool in cluster.pools.values():
            pool.task.cancel()
    asyncio.run(test())
