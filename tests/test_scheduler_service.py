"""`pagedserve scheduler` with real executor processes: Submit streams tokens equal to
transformers' greedy output, cancelling frees the blocks, stats and the model relay answer,
bad requests fail clearly, and when an executor dies mid-generation every request completes
on the other one with the same tokens."""

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import internal_channel
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
EOS = 2


class Cluster:
    def __init__(self, model_dir, tmp_path, executors: int, scheduler_flags=()):
        ports = free_ports(1 + executors)
        self.address = f"127.0.0.1:{ports[0]}"
        self.executor_ports = ports[1:]
        self.log = (tmp_path / "cluster.log").open("w")
        self.scheduler = self._start("scheduler", "--port", str(ports[0]),
                                     "--heartbeat-interval", "0.2", *scheduler_flags)
        self.executors = [self._start(
            "executor", "--port", str(port), "--model", str(model_dir), "--block-size", "4",
            "--kv-cache-gib", "0.001", "--max-model-len", "128",
            "--scheduler-address", self.address) for port in ports[1:]]
        self.channel = internal_channel(self.address, Role.GATEWAY)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.wait_for_executors(executors)

    def _start(self, *argv):
        return subprocess.Popen([sys.executable, "-m", "pagedserve", *argv, "--log-format",
                                 "json"], stdout=self.log, stderr=self.log)

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return self.stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)

    def wait_for_executors(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if len(self.stats().executors) == count:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "executors did not register"
            time.sleep(0.2)

    def submit(self, prompt, max_tokens, **sampling):
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling)
        return self.stub.Submit(scheduler_pb2.SubmitRequest(prompt_token_ids=prompt,
                                                            sampling=params), timeout=120)

    def close(self):
        self.channel.close()
        for process in [*self.executors, self.scheduler]:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def expected_tokens(hf_model, prompt, max_tokens):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def collect(stream) -> tuple[list[int], int]:
    tokens, reason = [], 0
    for delta in stream:
        tokens += delta.token_ids
        reason = delta.finish_reason or reason
    return tokens, reason


def test_submit_streams_greedy_tokens_and_cancel_frees_blocks(tiny_llama_dir, tmp_path,
                                                               hf_model):
    cluster = Cluster(tiny_llama_dir, tmp_path, executors=1)
    try:
        prompts = [list(range(30, 30 + n)) for n in (1, 4, 9, 17)]
        streams = [cluster.submit(p, 12, ignore_eos=True) for p in prompts]
        for prompt, stream in zip(prompts, streams, strict=True):
            tokens, reason = collect(stream)
            assert tokens == expected_tokens(hf_model, prompt, 12)
            assert reason == common_pb2.FINISH_REASON_LENGTH

        long_stream = cluster.submit(list(range(40, 60)), 100, ignore_eos=True)
        next(long_stream)
        long_stream.cancel()
        deadline = time.monotonic() + 10
        while True:
            executor = cluster.stats().executors[0]
            if executor.free_blocks == executor.total_blocks:
                break
            assert time.monotonic() < deadline, "cancelled request kept its blocks"
            time.sleep(0.05)
        stats = cluster.stats()
        assert stats.num_running == 0 and stats.num_steps > 0
        assert stats.prefix_cache_queried_tokens > 0

        model = cluster.stub.GetModel(scheduler_pb2.GetModelRequest(), timeout=10)
        assert model.model.model_id == tiny_llama_dir.name
        assert "tokenizer.json" in model.tokenizer.files

        with pytest.raises(grpc.RpcError) as error:
            collect(cluster.submit(list(range(130)), 4))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context limit is 128" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            collect(cluster.stub.Submit(scheduler_pb2.SubmitRequest(
                model="nope", prompt_token_ids=[1]), timeout=10))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        cluster.close()


def test_requests_survive_the_loss_of_an_executor(tiny_llama_dir, tmp_path, hf_model):
    cluster = Cluster(tiny_llama_dir, tmp_path, executors=2)
    try:
        prompts = [list(range(20 + 3 * i, 26 + 3 * i)) for i in range(6)]
        new_tokens = 80
        results: dict[int, tuple] = {}
        first_tokens = threading.Barrier(len(prompts) + 1)

        def run(i):
            tokens, reason = [], 0
            for delta in cluster.submit(prompts[i], new_tokens, ignore_eos=True):
                if not tokens and delta.token_ids:
                    first_tokens.wait(timeout=60)
                tokens += delta.token_ids
                reason = delta.finish_reason or reason
            results[i] = (tokens, reason)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        first_tokens.wait(timeout=60)  # every request is generating
        # Killed: an executor running requests now. (Both got some, but one may have finished
        # its own already: a tiny model's decode steps take a few milliseconds.)
        busy = [e for e in cluster.stats().executors if e.num_running]
        assert busy, "no executor is running the requests"
        port = int(busy[0].address.rsplit(":", 1)[1])
        cluster.executors[cluster.executor_ports.index(port)].send_signal(signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=120)
        for i, prompt in enumerate(prompts):
            assert results[i] == (expected_tokens(hf_model, prompt, new_tokens),
                                  common_pb2.FINISH_REASON_LENGTH), i
        cluster.wait_for_executors(1, timeout=10)
    finally:
        cluster.close()


def test_no_executor_fails_with_unavailable_after_the_timeout(tiny_llama_dir, tmp_path):
    cluster = Cluster(tiny_llama_dir, tmp_path, executors=0,
                      scheduler_flags=("--no-executor-timeout", "1"))
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            collect(cluster.submit([1, 2, 3], 4))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no executor" in error.value.details()
        assert 0.9 < time.monotonic() - started < 10
    finally:
        cluster.close()
