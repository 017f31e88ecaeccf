"""Services as processes on free loopback ports, for the tests and the benchmarks: a whole
`pagedserve up` stack or one executor, each returned once it answers; and the credentials to
call them as one of the internal roles."""

import contextlib
import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc

from pagedserve.runtime.internal_auth import SECRET_ENV, InternalAuth, Role, new_secret
from pagedserve.runtime.serving import NO_TLS, TlsConfig, free_ports
from pagedserve.v1 import executor_pb2, executor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


def shared_internal_secret() -> str:
    """The internal secret of every service this process starts: made once and kept in its
    environment, which each child inherits."""
    return os.environ.setdefault(SECRET_ENV, new_secret())


def internal_auth(role: Role, tls: TlsConfig = NO_TLS) -> InternalAuth:
    """The credentials of `role` in the services this process starts."""
    return InternalAuth(role, tls, shared_internal_secret())


def internal_channel(address: str, role: Role, tls: TlsConfig = NO_TLS) -> grpc.Channel:
    """A blocking channel to an internal service that calls as `role`."""
    return internal_auth(role, tls).sync_channel(address)


def port_is_free(port: int) -> bool:
    """Whether a new server could listen on it (servers set SO_REUSEADDR, so connections in
    TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_consecutive_ports(count: int) -> int:
    """The first of `count` consecutive free ports (executor i listens on base + i)."""
    for base in free_ports(20):
        if all(port_is_free(base + i) for i in range(1, count)):
            return base
    raise AssertionError("no consecutive free ports")


def stack_ports(executors: int = 1) -> tuple[int, int, int, int]:
    """Free ports for `pagedserve up`: the gateway's HTTP and gRPC ones, the scheduler's, and
    the first of `executors` consecutive ones, all different. Asked for one call after the
    other, ports can repeat (each call's are free again once it returns)."""
    executor = free_consecutive_ports(executors)
    while True:
        http, grpc_port, scheduler = free_ports(3)
        if not {http, grpc_port, scheduler} & set(range(executor, executor + executors)):
            return http, grpc_port, scheduler, executor


def start_executor(model_dir: pathlib.Path, log_path: pathlib.Path, *flags: str,
                   timeout: float = 120):
    """`pagedserve executor` on a free port, once it answers Describe:
    (process, address, description)."""
    shared_internal_secret()
    (port,) = free_ports(1)
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "executor", "--port", str(port), "--model",
         str(model_dir), "--log-format", "json", *flags], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with internal_channel(address, Role.SCHEDULER) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        while True:
            try:
                return process, address, stub.Describe(executor_pb2.DescribeRequest(),
                                                       timeout=2)
            except grpc.RpcError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "executor did not start"
                time.sleep(0.2)


class RunningStack(str):
    """The gateway's base URL, also knowing the scheduler's address."""

    def __new__(cls, base: str, scheduler: str, grpc_address: str, log_path: pathlib.Path,
                pid: int):
        stack = super().__new__(cls, base)
        stack.scheduler, stack.grpc, stack.log_path = scheduler, grpc_address, log_path
        stack.pid = pid  # `pagedserve up`'s, the parent of the stack's processes
        return stack

    def stats(self) -> scheduler_pb2.SchedulerStats:
        with internal_channel(self.scheduler, Role.GATEWAY) as channel:
            return scheduler_pb2_grpc.SchedulerStub(channel).GetStats(
                scheduler_pb2.GetStatsRequest(), timeout=5)

    def wait_until_all_blocks_free(self, timeout: float = 15) -> scheduler_pb2.SchedulerStats:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(e.free_blocks == e.total_blocks for e in stats.executors):
                return stats
            assert time.monotonic() < deadline, "an aborted request kept its blocks"
            time.sleep(0.05)


def wait_until_answers(url: str, timeout: float, process: subprocess.Popen | None = None,
                       ssl_context: ssl.SSLContext | None = None) -> None:
    """Polls `url` until it answers 200; AssertionError after `timeout` seconds, or as soon as
    `process` (the server, when given) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ssl_context):
                return
        except (urllib.error.URLError, ConnectionError):
            assert process is None or process.poll() is None, f"the server of {url} exited"
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
            time.sleep(0.2)


@contextlib.contextmanager
def running_stack(log_path, *model_flags: str, ssl_context: ssl.SSLContext | None = None,
                  env: dict[str, str] | None = None):
    """`pagedserve up` on free ports, once ready; stopped on exit. With `ssl_context` (the
    flags then carry certificates) readiness is checked over HTTPS. `env`: the stack's
    environment (default: this process's)."""
    shared_internal_secret()
    http, grpc_port, scheduler, executor = stack_ports()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "up", *model_flags,
         "--http-port", str(http), "--grpc-port", str(grpc_port), "--scheduler-port",
         str(scheduler), "--executor-port", str(executor), "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + 180
    while "pagedserve is up" not in process.stdout.readline():
        assert process.poll() is None and time.monotonic() < deadline, "stack did not start"
    base = f"{'https' if ssl_context else 'http'}://127.0.0.1:{http}"
    # Ready once the executor registered.
    wait_until_answers(f"{base}/ready", deadline - time.monotonic(), ssl_context=ssl_context)
    try:
        yield RunningStack(base, f"127.0.0.1:{scheduler}", f"127.0.0.1:{grpc_port}", log_path,
                           process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def post_json(url: str, data: bytes, timeout: float = 60) -> tuple[int, dict, float]:
    """POST a JSON body: (status, JSON reply, seconds), error statuses included."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    return status, json.loads(raw), time.perf_counter() - start
