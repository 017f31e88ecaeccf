"""A tensor-parallel group of executor processes (docs/design.md §5): how its ranks start, join and
follow rank 0.

Rank 0 is the executor the scheduler sees (one registration, one Run stream, one address). With
`--tensor-parallel-size N` it starts ranks 1 .. N-1 itself, as child processes of the same
host (`python -m pagedserve.executor.tp_follower --rank R ...`, with rank 0's engine flags), so a
group is one unit to deploy and to lose: one pod with N GPUs on Kubernetes. Ranks need a fast
interconnect for two all-reduces per layer; a group spanning hosts is not supported.

- Joining: the ranks meet through torch.distributed's file store in a private temporary
  directory of rank 0's (mode 0700: no listening socket, and only this user's processes can
  join), then form the process group (NCCL on cuda, rank R on cuda:R; gloo on cpu, the cores
  shared out; their sockets on loopback) before each loads its slice of the weights.
- Following: rank 0 writes every step plan it receives (its protobuf bytes, length-prefixed)
  to each follower's stdin before running it, and a reset when a new scheduler stream starts.
  Every rank applies the same plan to its own mirror of the requests and runs the same forward
  pass; rank 0 alone samples and broadcasts the sampled tokens, so the mirrors stay equal.
  A pipe, not a collective, carries the plans: an idle executor waits for its next plan
  indefinitely, which a collective's timeout would not allow.
- Failing: a follower reads EOF when rank 0 goes away and exits; the kernel kills it when rank
  0 dies (PR_SET_PDEATHSIG). A follower that dies, or a step that fails on rank 0 (the
  followers may be left waiting in a collective), takes rank 0 down at once (exit status 1,
  logged): the group cannot compute any more, and an executor that exits is what the scheduler
  (and Kubernetes) know how to replace: its requests are recomputed elsewhere.

`TensorParallelGroup` owns all of this for one process, from `start_group` (rank 0) or
`join_group` (a follower) to `close`; the model runner only calls it (relay a plan, relay a
reset, fail, close) and reads its `tp` for the collectives. A follower's entry point and its
loop are tp_follower.py.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import BinaryIO, NoReturn

import structlog
import torch
import torch.distributed as dist

from pagedserve.executor.config import EngineConfig
from pagedserve.executor.parallel import SINGLE, TensorParallel
from pagedserve.runtime.serving import die_with_parent
from pagedserve.v1 import executor_pb2

# A message to a follower: kind (one byte), payload length, payload.
_HEADER = struct.Struct("<BI")
_PLAN, _RESET = 1, 2
# How long ranks wait for each other: to join the group, and in a collective.
JOIN_TIMEOUT = timedelta(minutes=10)
# Seconds a follower gets to exit after its stdin closes, before it is killed.
CLOSE_TIMEOUT_S = 10.0

log = structlog.get_logger(__name__)


class Followers:
    """Rank 0's handle on ranks 1 .. N-1."""

    def __init__(self, processes: list[subprocess.Popen], rendezvous_dir: str):
        self.processes = processes
        self.rendezvous_dir = rendezvous_dir
        self._lock = threading.Lock()  # plans come from a worker thread, resets from the loop
        self._closing = False
        for rank, process in enumerate(processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), daemon=True,
                             name=f"tp-rank-{rank}-watch").start()

    @classmethod
    def start(cls, config: EngineConfig, rendezvous_dir: str,
              log_flags: Sequence[str] = ()) -> Followers:
        init_method = rendezvous_method(rendezvous_dir)
        # In a session of their own: a terminal's Ctrl-C (SIGINT to the foreground process
        # group) reaches rank 0 alone, which drains, then closes the followers.
        processes = [subprocess.Popen(follower_argv(config, rank, init_method, log_flags),
                                      stdin=subprocess.PIPE, preexec_fn=die_with_parent,
                                      start_new_session=True)
                     for rank in range(1, config.tensor_parallel_size)]
        return cls(processes, rendezvous_dir)

    def send_plan(self, plan: executor_pb2.StepPlan) -> None:
        self._send(_PLAN, plan.SerializeToString())

    def send_reset(self) -> None:
        self._send(_RESET, b"")

    def close(self) -> None:
        """Ends the followers: their stdin closes, they leave the group and exit."""
        self._closing = True
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)

    def abandon(self) -> NoReturn:
        """Rank 0 failed mid-step: the followers may wait in a collective it will never join,
        so the group cannot go on. It exits as when a follower dies (the kernel then ends the
        followers)."""
        log.error("the tensor-parallel group cannot go on; the executor stops (its requests "
                  "are recomputed on other executors)")
        shutil.rmtree(self.rendezvous_dir, ignore_errors=True)
        os._exit(1)

    def _send(self, kind: int, payload: bytes) -> None:
        message = _HEADER.pack(kind, len(payload)) + payload
        with self._lock:
            for process in self.processes:
                process.stdin.write(message)
                process.stdin.flush()

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        returncode = process.wait()
        if not self._closing:
            log.error("a tensor-parallel rank exited", rank=rank, returncode=returncode)
            self.abandon()


class TensorParallelGroup:
    """This process's membership of its tensor-parallel group, and the one owner of the group's
    lifecycle: rank 0 holds the followers it started, every rank of a group holds the process
    group. A single rank (`NO_GROUP`) has neither and every call is a no-op."""

    def __init__(self, tp: TensorParallel, followers: Followers | None = None):
        self.tp = tp
        self.followers = followers

    def relay_plan(self, plan: executor_pb2.StepPlan) -> None:
        """Rank 0: hands the plan to every follower before running it itself."""
        if self.followers is not None:
            self.followers.send_plan(plan)

    def relay_reset(self) -> None:
        if self.followers is not None:
            self.followers.send_reset()

    def fail(self, step_id: int) -> None:
        """Rank 0's step failed: with followers the group cannot go on (see Followers.abandon,
        which does not return); alone, the failure is the step's and the caller raises it."""
        if self.followers is not None:
            log.exception("a step failed on rank 0", step_id=step_id)
            self.followers.abandon()

    def close(self) -> None:
        """Stops the followers (rank 0) and leaves the process group (every rank of a group)."""
        if self.followers is not None:
            self.followers.close()
        if self.tp.size > 1:
            dist.destroy_process_group()


NO_GROUP = TensorParallelGroup(SINGLE)


def read_messages(stream: BinaryIO) -> Iterator[executor_pb2.StepPlan | None]:
    """A follower's side of the pipe Followers writes: each plan, or None for a reset, until
    the pipe closes."""
    while header := stream.read(_HEADER.size):
        if len(header) < _HEADER.size:
            return
        kind, length = _HEADER.unpack(header)
        payload = stream.read(length)
        if kind == _RESET:
            yield None
        elif kind == _PLAN:
            yield executor_pb2.StepPlan.FromString(payload)


def rendezvous_method(rendezvous_dir: str) -> str:
    return f"file://{rendezvous_dir}/store"


def follower_argv(config: EngineConfig, rank: int, init_method: str,
                  log_flags: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pagedserve.executor.tp_follower", "--rank", str(rank),
            "--init-method", init_method, *log_flags, *config.to_argv()]


def join_group(rank: int, size: int, init_method: str, device: torch.device) -> TensorParallel:
    """Joins the group's process group (blocks until every rank has): a follower's `tp`, and
    rank 0's once it has started the followers (start_group)."""
    # The ranks share one host: their sockets stay on loopback unless the operator says
    # otherwise (gloo would otherwise listen on the address the host name resolves to).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=size,
                                timeout=JOIN_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                                timeout=JOIN_TIMEOUT)
        # N processes share the cores: each gets its part, as one process would use them all.
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    return TensorParallel(rank=rank, size=size, group=dist.group.WORLD)


def start_group(config: EngineConfig, device: torch.device,
                log_flags: Sequence[str] = ()) -> TensorParallelGroup:
    """Rank 0: starts the followers (with `config`, whose model is the resolved model
    directory, and `log_flags`) and joins the group with them. One rank: no group at all."""
    size = config.tensor_parallel_size
    if size == 1:
        return NO_GROUP
    rendezvous_dir = tempfile.mkdtemp(prefix="pagedserve-tp-")  # mode 0700
    followers = Followers.start(config, rendezvous_dir, log_flags)
    try:
        tp = join_group(0, size, rendezvous_method(rendezvous_dir), device)
    except Exception:
        followers.close()
        raise
    return TensorParallelGroup(tp, followers)
