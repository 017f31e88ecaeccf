"""`pagedserve executor` as a process: Describe, the Run stream (results match transformers, a
malformed plan is answered with an error and the stream goes on, a newer stream supersedes an
older one), self-registration with a scheduler that starts late and later forgets it, and the
registration's session (heartbeats carry it; Run takes only the scheduler that holds it)."""

import contextlib
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.runtime.internal_auth import SESSION_HEADER, Role
from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import internal_channel, start_executor
from pagedserve.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

pytestmark = pytest.mark.slow


class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Records registrations; answers the first heartbeats `registered`, then forgets."""

    def __init__(self, forget_after: int):
        self.registrations: list[scheduler_pb2.RegisterExecutorRequest] = []
        self.heartbeats: list[scheduler_pb2.HeartbeatRequest] = []
        self.forget_after = forget_after
        self.registered_twice = threading.Event()

    def RegisterExecutor(self, request, context):
        self.registrations.append(request)
        if len(self.registrations) == 2:
            self.registered_twice.set()
        return scheduler_pb2.RegisterExecutorResponse(heartbeat_interval_s=0.1)

    def Heartbeat(self, request, context):
        self.heartbeats.append(request)
        return scheduler_pb2.HeartbeatResponse(
            registered=len(self.heartbeats) < self.forget_after)


@contextlib.contextmanager
def _executor(model_dir, log_path, *flags):
    """(stub calling as the scheduler, description, address)"""
    process, address, description = start_executor(
        model_dir, log_path, "--kv-cache-gib", "0.01", "--block-size", "4", *flags)
    channel = internal_channel(address, Role.SCHEDULER)
    yield executor_pb2_grpc.ExecutorStub(channel), description, address
    channel.close()
    process.terminate()
    assert process.wait(timeout=30) == 0


@pytest.fixture
def executor(tiny_llama_dir, tmp_path):
    """An executor that registers with no scheduler: the test drives Run as the scheduler."""
    with _executor(tiny_llama_dir, tmp_path / "executor.log") as running:
        yield running


@pytest.fixture
def registering_executor(tiny_llama_dir, tmp_path):
    """An executor that registers with a scheduler at the port it also yields (nothing
    listens there yet)."""
    (scheduler_port,) = free_ports(1)
    with _executor(tiny_llama_dir, tmp_path / "executor.log", "--scheduler-address",
                   f"127.0.0.1:{scheduler_port}") as (stub, description, address):
        yield stub, description, address, scheduler_port


def greedy_plans(prompt: list[int], steps: int):
    """Plans for one greedy request: its prefill, then decodes (one block per 4 tokens)."""
    yield executor_pb2.StepPlan(
        step_id=1,
        new_requests=[executor_pb2.NewRequest(
            request_id="r", token_ids=prompt, num_prompt_tokens=len(prompt),
            sampling=common_pb2.SamplingParams(temperature=0.0), block_ids=list(range(8)))],
        work=[executor_pb2.ScheduledWork(request_id="r", num_tokens=len(prompt))])
    for step in range(2, steps + 1):
        yield executor_pb2.StepPlan(step_id=step, work=[
            executor_pb2.ScheduledWork(request_id="r", num_tokens=1)])


def test_describe_reports_model_capacity_and_limits(executor, tiny_llama_dir):
    _, description, _ = executor
    assert description.model.model_id == tiny_llama_dir.name
    assert description.model.dtype == "float32"
    assert description.kv_cache.block_size == 4 and description.kv_cache.num_blocks > 100
    assert description.limits.max_num_seqs == 256
    assert "tokenizer.json" in description.tokenizer.files


def test_run_stream_matches_transformers_and_survives_a_bad_plan(executor, tiny_llama_dir):
    stub, _, _ = executor
    prompt = list(range(40, 50))
    plans = list(greedy_plans(prompt, 5))
    bad = executor_pb2.StepPlan(step_id=3, work=[
        executor_pb2.ScheduledWork(request_id="ghost", num_tokens=1)])
    for later, plan in enumerate(plans[2:], start=4):
        plan.step_id = later
    results = list(stub.Run(iter([*plans[:2], bad, *plans[2:]]), timeout=60))
    assert [r.step_id for r in results] == [1, 2, 3, 4, 5, 6]
    (refused,) = results[2].failed_requests  # the request is refused, not the stream
    assert refused.request_id == "ghost" and "unknown request 'ghost'" in refused.message
    assert not results[2].outputs and not results[2].error
    tokens = [t for r in results for o in r.outputs for t in o.token_ids]

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=5,
                                     min_new_tokens=5, do_sample=False)[0, len(prompt):]
    assert tokens == expected.tolist()


def test_a_new_stream_supersedes_the_old_one(executor):
    stub, _, _ = executor
    prompt = list(range(40, 50))
    first_plans = greedy_plans(prompt, 3)
    gate = threading.Event()

    def slow_plans():
        yield next(first_plans)
        gate.wait(30)  # hold the stream open until the second one has started
        yield from first_plans

    old = stub.Run(slow_plans(), timeout=60)
    assert next(old).step_id == 1
    new_results = list(stub.Run(greedy_plans(prompt, 2), timeout=60))
    gate.set()
    # The new stream found no mirror of "r" left over: its NewRequest "r" was accepted.
    assert not new_results[0].error and new_results[1].outputs
    with pytest.raises(grpc.RpcError) as error:
        list(old)
    assert error.value.code() == grpc.StatusCode.ABORTED


def test_registers_late_and_again_when_forgotten(registering_executor):
    _, description, address, scheduler_port = registering_executor
    time.sleep(1.0)  # the executor is already retrying: no scheduler yet
    fake = FakeScheduler(forget_after=3)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    server.add_insecure_port(f"127.0.0.1:{scheduler_port}")
    server.start()
    try:
        assert fake.registered_twice.wait(timeout=30), fake.registrations
    finally:
        server.stop(None)
    first = fake.registrations[0]
    assert first.executor_id == description.executor_id
    assert first.address == address
    assert first.kv_cache == description.kv_cache and first.model == description.model
    assert len(fake.heartbeats) >= 3
    assert len(first.session_token) >= 32
    assert {h.session_token for h in fake.heartbeats} == {first.session_token}


def test_a_registered_executor_runs_only_its_schedulers_stream(registering_executor):
    stub, _, _, scheduler_port = registering_executor
    fake = FakeScheduler(forget_after=10**6)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, server)
    server.add_insecure_port(f"127.0.0.1:{scheduler_port}")
    server.start()
    try:
        deadline = time.monotonic() + 30
        while not fake.registrations:
            assert time.monotonic() < deadline, "the executor did not register"
            time.sleep(0.05)
        token = fake.registrations[0].session_token
        for presented in ([], [(SESSION_HEADER, "0" * 64)]):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Run(greedy_plans([5, 6, 7], 1), timeout=30, metadata=presented))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        results = list(stub.Run(greedy_plans([5, 6, 7], 1), timeout=30,
                                metadata=[(SESSION_HEADER, token)]))
        assert results[0].outputs and not results[0].error
    finally:
        server.stop(None)


class ThreadRecordingRunner:
    def __init__(self):
        self.threads: set[int] = set()

    def reset(self):
        pass

    def step(self, plan):
        self.threads.add(threading.get_ident())
        return executor_pb2.StepResult(step_id=plan.step_id)


class FakeContext:
    def peer(self):
        return "test"


def test_every_step_runs_on_the_one_step_thread():
    """torch's OpenMP team belongs to the calling thread: steps must not hop between threads,
    even while other work keeps the event loop's default thread pool busy."""
    import asyncio

    from pagedserve.executor.server import ExecutorService

    async def scenario() -> set[int]:
        runner = ThreadRecordingRunner()
        with futures.ThreadPoolExecutor(max_workers=1) as step_thread:
            service = ExecutorService(runner, executor_pb2.DescribeResponse(), step_thread)

            # Blocking work beside the steps, each job taking the default pool's idle thread
            # and holding it to the end: a step run in that pool would move to a new thread.
            release, beside = threading.Event(), []
            loop = asyncio.get_running_loop()

            async def plans():
                for step_id in range(50):
                    if step_id < 3:
                        await asyncio.sleep(0.02)  # the last step's thread is idle again
                        beside.append(loop.run_in_executor(None, release.wait))
                    yield executor_pb2.StepPlan(step_id=step_id)

            results = [r.step_id async for r in service.Run(plans(), FakeContext())]
            release.set()
            await asyncio.gather(*beside)
        assert results == list(range(50))
        return runner.threads

    assert len(asyncio.run(scenario())) == 1


class WedgedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Refuses every registration as a scheduler does an executor it dropped as wedged."""

    def RegisterExecutor(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      f"executor {request.executor_id} was dropped because a step ran past "
                      "its bound; restart it")


def test_an_executor_refused_as_wedged_exits_for_a_restart(tiny_llama_dir, tmp_path):
    """Its supervisor (up, Kubernetes) then starts a fresh process under a new id."""
    (scheduler_port,) = free_ports(1)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(WedgedScheduler(), server)
    server.add_insecure_port(f"127.0.0.1:{scheduler_port}")
    server.start()
    (port,) = free_ports(1)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pagedserve", "executor", "--port", str(port), "--model",
             str(tiny_llama_dir), "--kv-cache-gib", "0.01", "--scheduler-address",
             f"127.0.0.1:{scheduler_port}"], capture_output=True, text=True, timeout=120)
    finally:
        server.stop(None)
    assert done.returncode == 1, done.stderr
    assert "refused this executor" in done.stderr + done.stdout
