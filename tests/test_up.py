"""`pagedserve up`: starts gateway, scheduler and executors as separate processes, waits until
each is healthy, restarts one that dies while the others keep serving, and leaves no process or
port behind however it is stopped."""

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.entrypoints.launcher import MAX_QUICK_EXITS, STABLE_S, RestartPolicy
from pagedserve.runtime.internal_auth import Role
from pagedserve.testing.processes import internal_channel, port_is_free, stack_ports
from pagedserve.v1 import executor_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

READY_LINE = "pagedserve is up:"
pytestmark = pytest.mark.slow


class Stack:
    def __init__(self, model_dir, log_file, executors: int = 1):
        self.http, self.grpc, self.scheduler, base = stack_ports(executors)
        self.executors = list(range(base, base + executors))
        argv = [sys.executable, "-m", "pagedserve", "up", "--log-format", "json",
                "--executors", str(executors), "--http-port", str(self.http),
                "--grpc-port", str(self.grpc), "--scheduler-port", str(self.scheduler),
                "--executor-port", str(self.executors[0]), "--model", str(model_dir),
                "--kv-cache-gib", "0.01"]
        # Logs to a file: a pipe nobody reads would fill up and block the processes.
        self.log_file = log_file
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file.open("w"),
                                        text=True)
        self.ports = [self.http, self.grpc, self.scheduler, *self.executors]
        self.stdout = ""

    def wait_until_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.stdout:
            assert time.monotonic() < deadline, "stack did not come up"
            assert self.process.poll() is None, self.log_file.read_text()
            self.stdout += self.process.stdout.readline()
        for _ in range(len(self.executors) + 3):  # a line per process, then "Press Ctrl-C"
            self.stdout += self.process.stdout.readline()

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def grpc_serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def assert_all_gone(pids: list[int], ports: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        busy = [p for p in ports if not port_is_free(p)]
        if not alive and not busy:
            return
        time.sleep(0.2)
    raise AssertionError(f"left behind: processes {alive}, ports {busy}")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_starts_every_process_and_stops_them_all(tiny_llama_dir, tmp_path, stop_signal):
    stack = Stack(tiny_llama_dir, tmp_path / "log", executors=2)
    try:
        stack.wait_until_up()
        children = stack.children()
        names = [" ".join(c.cmdline()[3:4]) for c in children]
        assert sorted(names) == ["executor", "executor", "gateway", "scheduler"]
        pids = {c.pid for c in children}
        assert len(pids) == 4 and stack.process.pid not in pids  # `up` is none of them
        for port in (stack.grpc, stack.scheduler, *stack.executors):
            assert grpc_serving(port)
        with internal_channel(f"127.0.0.1:{stack.executors[1]}", Role.SCHEDULER) as channel:
            description = executor_pb2_grpc.ExecutorStub(channel).Describe(
                executor_pb2.DescribeRequest(), timeout=5)
        assert description.model.model_id == tiny_llama_dir.name
        assert description.model.eos_token_ids == [2]
        assert "tokenizer.json" in description.tokenizer.files
        assert f"http://127.0.0.1:{stack.http}/v1" in stack.stdout

        stack.process.send_signal(stop_signal)
        assert stack.process.wait(timeout=30) == 0
        assert_all_gone([c.pid for c in children], stack.ports)
    finally:
        stack.process.kill()


def test_children_die_with_a_killed_launcher(tiny_llama_dir, tmp_path):
    stack = Stack(tiny_llama_dir, tmp_path / "log")
    try:
        stack.wait_until_up()
        children = stack.children()
        stack.process.kill()  # no chance to clean up: the kernel must take the children down
        stack.process.wait(timeout=10)
        assert_all_gone([c.pid for c in children], stack.ports)
    finally:
        stack.process.kill()


def test_a_failing_child_stops_the_stack_with_its_error(tiny_llama_dir, tmp_path):
    stack = Stack(tmp_path / "missing-model", tmp_path / "log")
    try:
        assert stack.process.wait(timeout=120) == 1
        stderr = stack.log_file.read_text()
        assert "no such file or directory" in stderr  # the executor's own one-line error
        assert "pagedserve up: error: executor 0 exited with status 2 while starting" in stderr
        assert_all_gone([], stack.ports)
    finally:
        stack.process.kill()


def test_a_port_in_use_is_reported():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pagedserve", "scheduler", "--port", str(port),
             "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(line["event"] == "cannot start" and line["service"] == "scheduler"
               for line in lines)


def test_restarts_back_off_and_a_crash_loop_gives_up():
    policy = RestartPolicy()
    quick = [policy.after_exit(ran_s=1.0) for _ in range(MAX_QUICK_EXITS + 1)]
    assert quick == [1.0, 2.0, 4.0, 8.0, 16.0, None]
    policy = RestartPolicy()
    delays = [policy.after_exit(ran_s) for ran_s in (1.0, 1.0, 1.0, STABLE_S, 1.0)]
    assert delays == [1.0, 2.0, 4.0, 1.0, 2.0]  # a stable run starts the backoff over


def _stream_completion(base: str, prompt: str, max_tokens: int) -> list[dict]:
    """The events of one streamed completion (usage included)."""
    request = urllib.request.Request(
        f"{base}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                         "stream": True, "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request, timeout=120) as reply:
        return [json.loads(line[len(b"data: "):]) for line in reply
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]"]


def _child(stack: Stack, *words: str) -> psutil.Process:
    (child,) = [c for c in stack.children()
                if all(word in c.cmdline() for word in words) and "-m" in c.cmdline()]
    return child


def test_a_dead_child_is_restarted_while_the_others_keep_serving(tiny_llama_dir, tmp_path):
    """The issue's case: `up --executors 2`, 8 streams, kill -9 of one executor. Every stream
    completes (the lost executor's requests are recomputed on the other), the executor comes
    back and registers again; a killed gateway comes back too."""
    stack = Stack(tiny_llama_dir, tmp_path / "log", executors=2)
    base = f"http://127.0.0.1:{stack.http}"
    try:
        stack.wait_until_up()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(_stream_completion, base, f"the cat {i}", 120)
                       for i in range(8)]
            with internal_channel(f"127.0.0.1:{stack.scheduler}", Role.GATEWAY) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                deadline = time.monotonic() + 60
                while not all(e.num_running for e in stub.GetStats(
                        scheduler_pb2.GetStatsRequest(), timeout=5).executors):
                    assert time.monotonic() < deadline, "the load never reached both executors"
                    time.sleep(0.02)
                victim = _child(stack, "executor", str(stack.executors[0]))
                victim.kill()
                events = [stream.result(timeout=120) for stream in streams]
                for stream_events in events:
                    assert not any("error" in event for event in stream_events), stream_events
                    assert stream_events[-1]["usage"]["completion_tokens"] == 120
                deadline = time.monotonic() + 120
                while len(stub.GetStats(scheduler_pb2.GetStatsRequest(),
                                        timeout=5).executors) < 2:
                    assert time.monotonic() < deadline, "the executor did not come back"
                    time.sleep(0.2)
        assert _child(stack, "executor", str(stack.executors[0])).pid != victim.pid
        gateway = _child(stack, "gateway")
        gateway.kill()
        deadline = time.monotonic() + 60
        while True:
            try:
                events = _stream_completion(base, "the dog", 4)
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not come back"
                time.sleep(0.2)
        assert events[-1]["usage"]["completion_tokens"] == 4
        assert _child(stack, "gateway").pid != gateway.pid
        assert stack.process.poll() is None  # `up` itself never stopped
    finally:
        stack.process.send_signal(signal.SIGTERM)
        stack.process.wait(timeout=60)
