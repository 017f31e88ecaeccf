"""Executor membership, request routing and recovery (docs/design.md §1, §6).

Executors register themselves and hold a lease by heartbeat; each gets a KV pool, a step
scheduler and a step loop. A new request goes to the executor of its model with the longest
prefix-cache hit, then the most free blocks, and lives there until it ends. When an executor is
lost (its Run stream breaks or its lease lapses), its unfinished requests are recomputed on
another executor from prompt + accepted tokens, so each client's stream continues without a gap
or duplicate; with no executor left they wait, up to a timeout, then fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from pagedserve.scheduler.admission import AdmissionError, PoolLimits, admit_request
from pagedserve.scheduler.executor_handle import ExecutorHandle
from pagedserve.scheduler.executor_pool import check_registration, schedule_executor
from pagedserve.scheduler.pool_loop import LoopEvents, Overlap, PoolLoop
from pagedserve.scheduler.sequence import Sequence, resumed_sequences
from pagedserve.scheduler.step_scheduler import StepScheduler
from pagedserve.v1 import common_pb2, scheduler_pb2

log = structlog.get_logger(__name__)

# A lease lapses after this many missed heartbeats.
MISSED_HEARTBEATS = 3
# A request is recomputed after losing its executor this many times less one; the next loss
# fails it: a request that keeps bringing executors down must not loop through the cluster.
MAX_EXECUTOR_LOSSES = 3


class NoExecutor(Exception):
    """No executor serves the model, and none came within the timeout."""


class UnknownModel(Exception):
    pass


class DuplicateRequest(Exception):
    """A request id already in flight (ALREADY_EXISTS): two requests under one id would share a
    stream and each other's sequences."""


class RegistrationConflict(Exception):
    """A registration under an executor id whose lease another session holds."""


class ExecutorWedged(Exception):
    """A registration of an executor dropped for a step past its bound: the process is stuck
    (its event loop still answers) and must be restarted to come back, under a new id."""


@dataclass(frozen=True)
class ClusterConfig:
    overlap: Overlap = Overlap.AUTO
    enable_prefix_caching: bool = True
    heartbeat_interval_s: float = 2.0
    # How long requests wait for an executor when none is left.
    no_executor_timeout_s: float = 30.0
    # The step watchdog's base bound (pool_loop.PoolLoop).
    step_timeout_s: float = 120.0


@dataclass(eq=False)
class Pool:
    """One registered executor and everything the scheduler keeps for it."""

    registration: scheduler_pb2.RegisterExecutorRequest
    limits: PoolLimits
    scheduler: StepScheduler
    loop: PoolLoop
    handle: ExecutorHandle
    lease_deadline: float
    task: asyncio.Task | None = None

    @property
    def executor_id(self) -> str:
        return self.registration.executor_id

    @property
    def model_id(self) -> str:
        return self.registration.model.model_id


@dataclass(frozen=True)
class Submission:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    priority: int
    emit: Callable[[scheduler_pb2.TokenDelta], None]
    cache_salt: str = ""
    # A resubmission: the output so far of each sequence (SubmitRequest.resumed_sequences).
    resumed: tuple[scheduler_pb2.ResumedSequence, ...] = ()


@dataclass(eq=False)
class _Orphan:
    """A request waiting for an executor: a new one (submission), or the unfinished sequences
    of one whose executor was lost."""

    model: str
    request_id: str
    prompt_token_ids: list[int]
    deadline: float
    # Routes it to the executor with the longest hit of its own cache namespace.
    cache_salt: bytes = b""
    submission: Submission | None = None
    seqs: list[Sequence] | None = None
    # Sequences the gateway stopped while the request waited: stopped once it is placed.
    stopped: set[int] = field(default_factory=set)


@dataclass
class Cluster:
    config: ClusterConfig
    # (address, session token) -> the executor's handle
    make_handle: Callable[[str, str], ExecutorHandle]
    pools: dict[str, Pool] = field(default_factory=dict)
    # request id -> the pool it lives on
    placement: dict[str, Pool] = field(default_factory=dict)
    # request id -> called with (code name, message) when the request cannot go on; holds
    # every request in flight, from `submit` until `finished`
    failures: dict[str, Callable[[str, str], None]] = field(default_factory=dict)
    orphans: list[_Orphan] = field(default_factory=list)
    # Ids of executors dropped as wedged: they may not register again.
    wedged: set[str] = field(default_factory=set)

    # -- membership ---------------------------------------------------------------------

    def register(self, registration: scheduler_pb2.RegisterExecutorRequest) -> None:
        """Adds the executor's pool. Raises, before anything changes, DescriptionError for a
        registration out of range, RegistrationConflict for an id whose lease another session
        holds and ExecutorWedged for an executor dropped as wedged; the same session
        registering again (its reply was lost) replaces its pool."""
        check_registration(registration)
        if registration.executor_id in self.wedged:
            raise ExecutorWedged(f"executor {registration.executor_id} was dropped because a "
                                 "step ran past its bound; restart it")
        scheduler, pool_limits = schedule_executor(registration,
                                                   self.config.enable_prefix_caching)
        old = self.pools.get(registration.executor_id)
        if old is not None and not hmac.compare_digest(
                old.registration.session_token.encode(), registration.session_token.encode()):
            raise RegistrationConflict(
                f"executor_id {registration.executor_id!r} is registered by another session; "
                "its lease must lapse first")
        if old is not None:
            self._lose(old, "registered again")
        handle = self.make_handle(registration.address, registration.session_token)
        pool = Pool(registration=registration, limits=pool_limits, scheduler=scheduler,
                    loop=None, handle=handle, lease_deadline=self._lease_deadline())
        pool.loop = PoolLoop(scheduler, handle, self.config.overlap, LoopEvents(
            on_lost=lambda reason, wedged: self._lose(pool, reason, wedged),
            on_refused=lambda request_id, reason: self._fail(
                request_id, "INTERNAL", f"the executor refused the request: {reason}")),
            self.config.step_timeout_s)
        pool.task = asyncio.create_task(pool.loop.run())
        self.pools[registration.executor_id] = pool
        log.info("executor registered", executor_id=registration.executor_id,
                 address=registration.address, model=registration.model.model_id,
                 kv_blocks=registration.kv_cache.num_blocks)
        self._adopt_orphans()

    def heartbeat(self, executor_id: str, session_token: str) -> bool:
        """Renews the lease of the executor's registration; False (register again) for an id
        not registered, or a session that does not hold it (which renews nothing)."""
        pool = self.pools.get(executor_id)
        if pool is None or not hmac.compare_digest(
                pool.registration.session_token.encode(), session_token.encode()):
            return False
        pool.lease_deadline = self._lease_deadline()
        return True

    def _lease_deadline(self) -> float:
        return time.monotonic() + MISSED_HEARTBEATS * self.config.heartbeat_interval_s

    def expire(self) -> None:
        """Drop executors whose lease lapsed; fail orphans that waited too long."""
        now = time.monotonic()
        for pool in [p for p in self.pools.values() if p.lease_deadline < now]:
            self._lose(pool, "lease expired (no heartbeat)")
        for orphan in [o for o in self.orphans if o.deadline < now]:
            self.orphans.remove(orphan)
            self._fail(orphan.request_id, "UNAVAILABLE",
                       f"no executor serves model {orphan.model!r} (waited "
                       f"{self.config.no_executor_timeout_s:.0f} s)")

    def _lose(self, pool: Pool, reason: str, wedged: bool = False) -> None:
        """Drops the executor and recomputes its requests elsewhere, each within its budget
        of MAX_EXECUTOR_LOSSES."""
        if self.pools.get(pool.executor_id) is not pool:
            return
        del self.pools[pool.executor_id]
        if wedged:
            self.wedged.add(pool.executor_id)
        log.warning("executor lost; recomputing its requests elsewhere",
                    executor_id=pool.executor_id, reason=reason)
        if pool.task is not None and pool.task is not asyncio.current_task():
            pool.task.cancel()
        asyncio.ensure_future(pool.handle.close())
        by_request: dict[str, list[Sequence]] = {}
        for seq in pool.scheduler.take_all():
            by_request.setdefault(seq.request.request_id, []).append(seq)
        deadline = time.monotonic() + self.config.no_executor_timeout_s
        for request_id, seqs in by_request.items():
            del self.placement[request_id]
            request = seqs[0].request
            request.executor_losses += 1
            if request.executor_losses >= MAX_EXECUTOR_LOSSES:
                self._fail(request_id, "INTERNAL",
                           f"the request lost {request.executor_losses} executors while it "
                           f"ran (the last: {reason}); it is not retried again, since it may "
                           "be what brings them down")
                continue
            self.orphans.append(_Orphan(pool.model_id, request_id,
                                        seqs[0].request.prompt_token_ids, deadline,
                                        cache_salt=seqs[0].request.cache_salt, seqs=seqs))
        self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        waiting, self.orphans = self.orphans, []
        for orphan in waiting:
            pool = self._route(orphan.model, orphan.prompt_token_ids, orphan.cache_salt)
            if pool is None:
                self.orphans.append(orphan)
            elif orphan.submission is not None:
                try:
                    self._place(pool, orphan.submission)
                except AdmissionError as exc:
                    self._fail(orphan.request_id, "INVALID_ARGUMENT", str(exc))
            else:
                self.placement[orphan.request_id] = pool
                pool.scheduler.requeue(orphan.seqs)
                for seq_index in orphan.stopped:
                    pool.scheduler.stop(orphan.request_id, seq_index)
                pool.loop.notify()

    # -- requests -----------------------------------------------------------------------

    def submit(self, model: str, submission: Submission,
               fail: Callable[[str, str], None]) -> None:
        """Queue a request. Raises, with nothing changed, DuplicateRequest for an id already in
        flight, AdmissionError when it could never run on the executor it is routed to, and
        UnknownModel when no registered executor serves its model."""
        if submission.request_id in self.failures:
            raise DuplicateRequest(f"request_id: {submission.request_id!r} is already in flight")
        model = self.resolve_model(model)
        salt = submission.cache_salt.encode()
        pool = self._route(model, submission.prompt_token_ids, salt)
        if pool is None:  # checked against the executor it lands on, later
            self.orphans.append(_Orphan(
                model, submission.request_id, submission.prompt_token_ids,
                time.monotonic() + self.config.no_executor_timeout_s, cache_salt=salt,
                submission=submission))
        else:
            self._place(pool, submission)
        self.failures[submission.request_id] = fail

    def _place(self, pool: Pool, submission: Submission) -> None:
        request = admit_request(submission.request_id, submission.prompt_token_ids,
                                submission.sampling, submission.priority, pool.limits,
                                submission.emit, cache_salt=submission.cache_salt,
                                resumed=submission.resumed)
        self.placement[request.request_id] = pool
        if submission.resumed:  # recomputed from prompt + output, as after an executor loss
            pool.scheduler.requeue(resumed_sequences(request, submission.resumed))
        else:
            pool.scheduler.add(request)
        pool.loop.notify()

    def finished(self, request_id: str) -> None:
        """The request's stream is over (completed, aborted or failed)."""
        self.failures.pop(request_id, None)
        pool = self.placement.pop(request_id, None)
        if pool is not None:
            pool.scheduler.abort(request_id)  # frees whatever is left; no-op when done
            pool.loop.notify()
        self.orphans = [o for o in self.orphans if o.request_id != request_id]

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        """One sequence of a request ends now (see StepScheduler.stop); for a request waiting
        for an executor (its own was lost), as soon as it is placed again, so the sequence is
        not recomputed for nothing."""
        pool = self.placement.get(request_id)
        if pool is not None:
            pool.scheduler.stop(request_id, seq_index)
            pool.loop.notify()
            return
        for orphan in self.orphans:
            if orphan.request_id == request_id:
                orphan.stopped.add(seq_index)

    def _fail(self, request_id: str, code: str, message: str) -> None:
        # Not popped: the id stays in flight until its stream ends (`finished`).
        fail = self.failures.get(request_id)
        if fail is not None:
            fail(code, message)

    def resolve_model(self, model: str) -> str:
        """The served model a request names ("" = the only one); raises UnknownModel."""
        served = {p.model_id for p in self.pools.values()}
        if not model:
            if len(served) > 1:
                raise UnknownModel(f"model: required, this scheduler serves {sorted(served)}")
            return next(iter(served), "")
        if served and model not in served:
            raise UnknownModel(f"model: {model!r} is not served (served: {sorted(served)})")
        return model

    def _route(self, model: str, prompt_token_ids: list[int], salt: bytes) -> Pool | None:
        """Longest prefix-cache hit (under the request's cache salt) first, then most free
        blocks not claimed by waiting requests."""
        candidates = [p for p in self.pools.values() if not model or p.model_id == model]
        if not candidates:
            return None
        return max(candidates, key=lambda p: (
            p.scheduler.blocks.num_cached_prefix_tokens(prompt_token_ids, salt),
            p.scheduler.num_unclaimed_free_blocks))
