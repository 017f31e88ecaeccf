"""`pagedserve up`: the whole stack as separate OS processes on one machine.

Starts the scheduler, N executors and the gateway (in that order) as child processes, waits until
each reports SERVING on grpc.health.v1 (and the gateway answers HTTP /health), prints the URLs,
then supervises as Kubernetes would: a child that exits is restarted after a backoff while the
others keep serving (a lost executor's requests are recomputed on the others; a restarted
scheduler gets its executors back as they re-register). On SIGINT / SIGTERM, a child that fails
while the stack starts, or one that crash-loops, it stops every child (SIGTERM, then SIGKILL after
a grace period) and exits. Children run in their own process group
and are killed by the kernel if `up` itself dies (PR_SET_PDEATHSIG), so no process is orphaned.
The children share an internal secret (PAGEDSERVE_INTERNAL_SECRET, made fresh for the run unless
given) through their environment: their internal ports answer no one else.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.runtime.flags import add_common_flags, add_tls_flags, passed_on
from pagedserve.runtime.internal_auth import SECRET_ENV, check_secret, new_secret
from pagedserve.runtime.log import configure_logging
from pagedserve.runtime.serving import StartupError, TlsConfig, die_with_parent, sync_channel

STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.2
# Restarts, as Kubernetes restarts a crashed container: the first after RESTART_BACKOFF_S,
# doubling up to MAX_RESTART_BACKOFF_S; a child that ran STABLE_S starts over from the first.
# A child that exits more than MAX_QUICK_EXITS times in a row, each time within STABLE_S of its
# start, is crash-looping: `up` reports it and stops.
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
STABLE_S = 60.0
MAX_QUICK_EXITS = 5

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The services' flag modules are light (no torch): `up` shares their defaults.
    from pagedserve.executor.config import DEFAULT_PORT as EXECUTOR_PORT
    from pagedserve.executor.config import add_engine_arguments, add_model_arguments
    from pagedserve.gateway.config import (
        DEFAULT_GRPC_PORT,
        DEFAULT_HTTP_PORT,
        add_api_key_argument,
        add_client_policy_arguments,
        add_request_timeout_argument,
    )
    from pagedserve.scheduler.config import DEFAULT_PORT as SCHEDULER_PORT
    from pagedserve.scheduler.config import add_overload_arguments, add_step_timeout_argument

    parser.add_argument("--host", default="127.0.0.1",
                        help="address every process listens on")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help="gateway's OpenAI-compatible HTTP port")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT,
                        help="gateway's public gRPC port")
    parser.add_argument("--scheduler-port", type=int, default=SCHEDULER_PORT,
                        help="scheduler's internal gRPC port")
    parser.add_argument("--executor-port", type=int, default=EXECUTOR_PORT,
                        help="internal gRPC port of executor 0; executor i listens on this + i")
    parser.add_argument("--executors", type=int, default=1, help="number of executor processes")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for every process to report healthy (the first "
                             "start converts the default model)")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    add_api_key_argument(parser)
    add_request_timeout_argument(parser)
    add_client_policy_arguments(parser)
    add_overload_arguments(parser)
    add_step_timeout_argument(parser)
    add_common_flags(parser)


@dataclass
class RestartPolicy:
    """When to restart a child that exited; see RESTART_BACKOFF_S."""

    quick_exits: int = 0

    def after_exit(self, ran_s: float) -> float | None:
        """Seconds to wait before restarting a child that ran `ran_s`; None: it crash-loops."""
        self.quick_exits = (0 if ran_s >= STABLE_S else self.quick_exits) + 1
        if self.quick_exits > MAX_QUICK_EXITS:
            return None
        return min(RESTART_BACKOFF_S * 2 ** (self.quick_exits - 1), MAX_RESTART_BACKOFF_S)


@dataclass
class Child:
    name: str
    argv: list[str]
    # True once the child serves; called repeatedly while starting.
    probes: list[Callable[[], bool]]
    url: str
    # Added to the inherited environment.
    env: dict[str, str] = field(default_factory=dict, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    started_at: float = 0.0
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    # time.monotonic() at which an exited child starts again; None while none is due.
    restart_at: float | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, process_group=0, preexec_fn=die_with_parent,
                                        stdin=subprocess.DEVNULL, env={**os.environ, **self.env})
        self.started_at = time.monotonic()
        log.info("started", process=self.name, pid=self.process.pid)

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None


def grpc_health_probe(address: str, tls: TlsConfig) -> Callable[[], bool]:
    def probe() -> bool:
        with sync_channel(address, tls) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    return probe


def http_health_probe(url: str, tls: TlsConfig) -> Callable[[], bool]:
    context = ssl.create_default_context(cafile=tls.ca_file) if tls.enabled else None

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return probe


def visible_gpus() -> list[str]:
    """The GPUs CUDA would see, as CUDA_VISIBLE_DEVICES entries, read without importing torch:
    the variable's own list where it is set, else one index per GPU the NVIDIA driver lists."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def executor_gpus(args: argparse.Namespace, gpus: list[str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each executor: executor i gets GPUs i*N .. i*N+N-1 (N the
    tensor-parallel size), so that executors on one host never share a GPU. Empty (nothing
    set) on the CPU or where no GPU is visible."""
    if args.device == "cpu" or not gpus:
        return []
    per_executor = max(1, args.tensor_parallel_size)
    needed = args.executors * per_executor
    if len(gpus) < needed:
        raise StartupError(f"--executors {args.executors} x --tensor-parallel-size "
                           f"{per_executor} need {needed} GPUs; {len(gpus)} visible "
                           f"({','.join(gpus)})")
    return [",".join(gpus[i * per_executor:(i + 1) * per_executor])
            for i in range(args.executors)]


def plan_children(args: argparse.Namespace) -> list[Child]:
    """The processes to start, in start order; raises StartupError for bad certificate flags."""
    from pagedserve.executor.config import EngineConfig
    from pagedserve.gateway.config import (
        add_client_policy_arguments,
        add_request_timeout_argument,
    )
    from pagedserve.scheduler.config import add_overload_arguments, add_step_timeout_argument

    base = [sys.executable, "-m", "pagedserve"]
    common = ["--host", args.host, "--log-level", args.log_level, "--log-format", args.log_format,
              *passed_on(args, add_tls_flags)]
    tls = TlsConfig.from_args(args)
    executor_flags = EngineConfig.from_args(args).to_argv()
    # Internal authentication is on in every stack: the children share a secret made for this
    # run (or the one given), handed over in the environment, never on a command line.
    secret = args.internal_secret or new_secret()
    check_secret(secret)
    internal = {SECRET_ENV: secret}

    gpu_sets = executor_gpus(args, visible_gpus())
    scheduler = f"{args.host}:{args.scheduler_port}"
    children = [Child("scheduler",
                      [*base, "scheduler", *common, "--port", str(args.scheduler_port),
                       *passed_on(args, add_overload_arguments, add_step_timeout_argument)],
                      [grpc_health_probe(scheduler, tls)], scheduler, env=internal)]
    for i in range(args.executors):
        port = args.executor_port + i
        address = f"{args.host}:{port}"
        children.append(Child(f"executor {i}",
                              [*base, "executor", *common, "--port", str(port),
                               "--scheduler-address", scheduler, *executor_flags],
                              [grpc_health_probe(address, tls)], address,
                              env={**internal, **({"CUDA_VISIBLE_DEVICES": gpu_sets[i]}
                                                  if gpu_sets else {})}))
    http_url = f"{'https' if tls.cert_file else 'http'}://{args.host}:{args.http_port}"
    grpc_address = f"{args.host}:{args.grpc_port}"
    gateway_argv = [*base, "gateway", *common, "--http-port", str(args.http_port),
                    "--grpc-port", str(args.grpc_port), "--scheduler-address", scheduler,
                    *passed_on(args, add_request_timeout_argument,
                               add_client_policy_arguments)]
    # The key travels in the environment, not on a command line that `ps` shows.
    gateway_env = {**internal, **({"PAGEDSERVE_API_KEY": args.api_key} if args.api_key else {})}
    children.append(Child("gateway", gateway_argv,
                          [grpc_health_probe(grpc_address, tls),
                           http_health_probe(f"{http_url}/health", tls)],
                          f"{http_url}/v1 (HTTP), {grpc_address} (gRPC)", env=gateway_env))
    return children


def supervise(children: list[Child], stop: threading.Event) -> str | None:
    """Restarts every child that exits, until `stop` is set; returns why it gave up (a child
    crash-loops), or None when stopped."""
    while not stop.wait(POLL_INTERVAL_S):
        now = time.monotonic()
        for child in children:
            if child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                child.start()
            elif child.restart_at is None and child.exited():
                status = child.process.returncode
                delay = child.restarts.after_exit(now - child.started_at)
                if delay is None:
                    return (f"{child.name} exited {MAX_QUICK_EXITS + 1} times in a row, each "
                            f"within {STABLE_S:.0f} s of starting (last status {status}); "
                            "stopping the stack")
                log.warning("exited; restarting", process=child.name, status=status,
                            restart_in_s=delay)
                child.restart_at = now + delay
    return None


def wait_healthy(children: list[Child], timeout_s: float, stop: threading.Event) -> str | None:
    """None when every child serves; otherwise why not."""
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        if stop.is_set():
            return "stopped before the stack was up"
        for child in pending:
            if child.exited():
                return f"{child.name} exited with status {child.process.returncode} while starting"
        pending = [c for c in pending if not all(probe() for probe in c.probes)]
        if time.monotonic() > deadline:
            return f"{', '.join(c.name for c in pending)} not healthy after {timeout_s:.0f} s"
        if pending:
            stop.wait(POLL_INTERVAL_S)
    return None


def stop_all(children: list[Child]) -> None:
    """SIGTERM to every live child, front door first; SIGKILL to those still alive later."""
    live = [c for c in reversed(children) if c.process is not None and not c.exited()]
    for child in live:
        child.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in live:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("did not stop in time, killing", process=child.name)
            child.process.kill()
            child.process.wait()
    log.info("all processes stopped")


def run(args: argparse.Namespace) -> int:
    configure_logging("up", args.log_level, args.log_format)
    if args.executors < 1:
        print("pagedserve up: error: --executors must be at least 1", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        children = plan_children(args)
    except StartupError as exc:  # e.g. incomplete certificate flags: before any child starts
        print(f"pagedserve up: error: {exc}", file=sys.stderr)
        return 2
    try:
        for child in children:
            child.start()
        failure = wait_healthy(children, args.startup_timeout, stop)
        if failure is not None:
            if stop.is_set():
                return 0
            print(f"pagedserve up: error: {failure}", file=sys.stderr)
            return 1
        print("pagedserve is up:", *(f"  {c.name:<12} {c.url}" for c in children),
              "Press Ctrl-C to stop.", sep="\n", flush=True)
        failure = supervise(children, stop)
        if failure is not None:
            print(f"pagedserve up: error: {failure}", file=sys.stderr)
            return 1
        return 0
    finally:
        stop_all(children)
