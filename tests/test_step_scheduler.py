"""The step scheduler (scheduler_svc/pagedserve/scheduler/step_scheduler.py) with its real
BlockManager and Request / Sequence, driven like the pool loop drives it (docs/design.md §4),
against a simulated executor and an independent reference. Fast: no torch, no processes.

The simulated executor (`SimExecutor`) keeps what a real one keeps: a mirror of each request
(built from the plans' new requests, forks and drops alone) and a KV pool, here a dict block id
-> one entry per slot naming what the K/V written there depends on (the cache salt and every
token up to that position). Every step it checks that each sequence's earlier positions hold its
own prefix (so a prefix-cache hit, a fork or a block copy gave the right content), that no block
held by two sequences is written, and that the plan keeps the executor's limits; when a step
computes a sequence's last known token it samples the next one from a deterministic toy model of
the whole token history (seeded by the sequence index, so the n sequences of a request differ).

The reference is what the same toy model generates for each prompt alone, token by token, with
the API's stop rules (common.proto): the tokens each request streams, whatever paging, chunking,
batching, prefix caching, forking, preemption, overlapped steps or a lost executor happened on
the way, must be exactly those, ending the same way. Every plan is also checked against the
step's budget and sequence limit, the waiting queue's priority order, the preemption rules (the
victim is the lowest-priority, latest-arrived unplanned sequence; a step that preempts admits
nothing) and the block accounting (the executor's tables equal the BlockManager's; the blocks
waiting sequences claim; no block is leaked once everything has finished).

Random workloads come from a hypothesis state machine (derandomized: the same examples every
run); explicit tests pin the exact boundaries (chunk caps, victims, stop rules, claims, overlap).
Three bugs this found, each fixed with its test ("bugs this file found" below): a child forked
in a step could be preempted (dropped) by the same plan; parents waiting to fork could hold the
whole pool with nothing ever planned again; the prompt logprobs of an n > 1 request whose
executor was lost between its fork and its first token were sent twice. A fourth, found by the
state machine once speculation joined its draws: an n > 1 request whose sequences were both
preempted after the fork and before the first token gathered its prompt logprobs again from
both, and cleared them when one was readmitted, so its first token came with none
(Request.prompt_logprobs_complete). A fifth, found once sliding windows joined its draws (the
new draw changed the examples, not the window): with overlapped steps and speculation, a
step planned without proposals of its own reserved no slot for a proposal the step in flight
could still accept, so the executor ran out of blocks (Sequence.lookahead_in_flight).

With speculation (`num_speculative_tokens`), the simulated executor proposes the toy model's
tokens with every third or so off by one, and verifies them as the runner does: the streams
must still be the reference's, and the mirrors run ahead of the scheduler by the proposals
accepted in results not yet applied.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.sequence import Request, SeqState, Sequence
from pagedserve.scheduler.step_scheduler import StepLimits, StepScheduler
from pagedserve.v1 import common_pb2, executor_pb2, scheduler_pb2

VOCAB = 16
EOS = 1
STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED
# max_output_tokens when max_tokens is unset: unlike admission (which caps it by the context),
# left uncapped so that the scheduler's own max_model_len check is what ends such a sequence.
NO_MAX_TOKENS = 1 << 30
_MERSENNE = (1 << 61) - 1

# (token history, number of prompt tokens, sequence index) -> the next token
Model = Callable[[SequenceType[int], int, int], int]


def toy_model(history: SequenceType[int], num_prompt_tokens: int, seq_index: int) -> int:
    """A deterministic 'model': a polynomial hash of the whole history, seeded by the sequence
    index (sequence i of an n > 1 request uses seed + i, so they differ)."""
    h = 0x2545F4914F6CDD1D + 7919 * seq_index
    for token in history:
        h = (h * 1_000_003 + token + 1) % _MERSENNE
    return h % VOCAB


def scripted(outputs: SequenceType[int]) -> Model:
    """A model that generates `outputs` in order, whatever the prompt."""
    def model(history: SequenceType[int], num_prompt_tokens: int, seq_index: int) -> int:
        return outputs[len(history) - num_prompt_tokens]
    return model


def kv_key(parent: int, token: int) -> int:
    """What the K/V at a position depends on: the key of the position before and its token."""
    return (parent * 1_000_003 + token + 7) % _MERSENNE


def salt_root(salt: bytes) -> int:
    return int.from_bytes(salt[:7].ljust(7, b"\0"), "little") * 31 + len(salt) + 1


# -- the reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    finish_reason: int
    stop_token_id: int | None


def reference_generation(prompt: SequenceType[int], sampling: common_pb2.SamplingParams,
                         seq_index: int, max_model_len: int, model: Model) -> Generation:
    """What `model` generates from `prompt` alone, one token at a time (no paging, batching,
    chunking or preemption), under the API's rules: EOS (unless ignore_eos) and stop_token_ids
    end with STOP, once min_tokens are out, and are not returned; max_tokens or the context
    limit end with LENGTH. The toy executor does not mask EOS before min_tokens, so the
    scheduler's own check is what keeps such a sequence going."""
    tokens, out = list(prompt), []
    while True:
        token = model(tokens, len(prompt), seq_index)
        if len(out) >= sampling.min_tokens and (
                (token == EOS and not sampling.ignore_eos) or token in sampling.stop_token_ids):
            return Generation(tuple(out), STOP, token)
        tokens.append(token)
        out.append(token)
        if ((sampling.HasField("max_tokens") and len(out) == sampling.max_tokens)
                or len(tokens) == max_model_len):
            return Generation(tuple(out), LENGTH, None)


def prompt_logprob(position: int, token: int) -> common_pb2.PositionLogprobs:
    """The toy executor's prompt logprob of the token at `position` (names the position)."""
    return common_pb2.PositionLogprobs(
        chosen=common_pb2.TokenLogprob(token_id=token, logprob=-float(position), rank=1))


def expected_prompt_logprobs(prompt: SequenceType[int]) -> list[common_pb2.PositionLogprobs]:
    """One entry per prompt token, the first empty (nothing predicts it), as the runner sends."""
    return [common_pb2.PositionLogprobs(),
            *(prompt_logprob(p, prompt[p]) for p in range(1, len(prompt)))]


# -- the simulated executor ---------------------------------------------------------------


@dataclass
class Mirror:
    """The executor's copy of one request (sequence): tokens, block table, computed count."""
    token_ids: list[int]
    num_prompt_tokens: int
    seq_index: int
    sampling: common_pb2.SamplingParams
    salt: bytes
    block_ids: list[int]
    num_computed: int
    keys: list[int] = field(default_factory=list)  # keys[p]: what position p's K/V depends on

    def key(self, position: int) -> int:
        while len(self.keys) <= position:  # token_ids only grows, so keys stay valid
            parent = self.keys[-1] if self.keys else salt_root(self.salt)
            self.keys.append(kv_key(parent, self.token_ids[len(self.keys)]))
        return self.keys[position]


def _waits_to_fork(seq: Sequence) -> bool:
    """Sequence 0 of an n > 1 request, its prompt but the last token computed, not forked."""
    request = seq.request
    return (seq.index == 0 and request.forks_first and not seq.forked
            and seq.num_computed == request.num_prompt_tokens - 1)


def request_id_of(seq_id: str) -> str:
    return seq_id.split("/")[0]


class SimExecutor:
    """Runs plans as the model runner does (executor_svc/.../runner.py), on a simulated KV
    pool, asserting on the way that the plan is valid and every read finds the right K/V."""

    def __init__(self, block_size: int, limits: StepLimits, model: Model,
                 salts: dict[str, bytes], window: int | None = None):
        self.block_size = block_size
        # With a sliding window a sequence reads, and holds, only the blocks of its next
        # query's window: the entries before them may have gone to other sequences.
        self.window = window
        self.limits = limits
        self.model = model
        self.salts = salts  # request id -> cache salt (not part of NewRequest)
        self.mirrors: dict[str, Mirror] = {}
        self.kv: dict[int, list[int | None]] = {}
        self.step_id = 0

    def run(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        step = plan.step_id
        assert step == self.step_id + 1, f"step ids must count up by one: {step}"
        self.step_id = step
        for seq_id in plan.dropped_request_ids:
            assert seq_id in self.mirrors, f"step {step}: drops unknown {seq_id}"
            del self.mirrors[seq_id]
        for new in plan.new_requests:
            self._create(new, step)
        # A copy fills the last block of a child forked in this plan, from its parent's.
        forks = {(new.block_ids[-1], self.mirrors[new.fork_of].block_ids[len(new.block_ids) - 1])
                 for new in plan.new_requests if new.fork_of and new.block_ids}
        for copy in plan.block_copies:  # before the forward pass, in order
            assert (copy.dst_block_id, copy.src_block_id) in forks, (
                f"step {step}: copy {copy.src_block_id} -> {copy.dst_block_id} is no fork's")
            self.kv[copy.dst_block_id] = list(self.kv[copy.src_block_id])
        holders: dict[int, set[str]] = defaultdict(set)
        for seq_id, mirror in self.mirrors.items():
            for block_id in mirror.block_ids[self._first_read(mirror.num_computed):]:
                holders[block_id].add(seq_id)
        for new in plan.new_requests:  # a hit, a fork's shared blocks or a copy: right K/V
            self._check_prefix(new.request_id, self.mirrors[new.request_id].num_computed, step)
        self._check_shared_blocks_are_full(holders, step)

        assert len(plan.work) <= self.limits.max_num_seqs, f"step {step}: too many sequences"
        assert sum(w.num_tokens + w.num_lookahead_tokens for w in plan.work) <= \
            self.limits.max_num_batched_tokens, f"step {step}: over the token budget"
        assert len({w.request_id for w in plan.work}) == len(plan.work), "scheduled twice"
        result = executor_pb2.StepResult(step_id=step)
        for work in plan.work:
            output = self._compute(work, holders, result, step)
            if output is not None:
                result.outputs.append(output)
        return result

    def _propose(self, mirror: Mirror, work: executor_pb2.ScheduledWork) -> list[int]:
        """Speculative proposals as the runner bounds them (its blocks, max_tokens, the model
        length), each the toy model's next token but every third or so off by one, so that
        proposals are accepted and rejected."""
        known = len(mirror.token_ids)
        room = min(work.num_lookahead_tokens, len(mirror.block_ids) * self.block_size - known,
                   self.limits.max_model_len - known - 1)
        if mirror.sampling.HasField("max_tokens"):
            room = min(room, mirror.sampling.max_tokens - (known - mirror.num_prompt_tokens) - 1)
        drafts: list[int] = []
        for j in range(max(0, room)):
            token = self.model(mirror.token_ids + drafts, mirror.num_prompt_tokens,
                               mirror.seq_index)
            wrong = (known + j + 3 * mirror.seq_index) % 3 == 0
            drafts.append((token + 1) % VOCAB if wrong else token)
        return drafts

    def _create(self, new: executor_pb2.NewRequest, step: int) -> None:
        assert new.request_id not in self.mirrors, f"step {step}: {new.request_id} exists"
        if new.fork_of:
            parent = self.mirrors[new.fork_of]
            # A fork shares everything its parent computed: the prompt but its last token.
            assert new.num_computed_tokens == parent.num_computed == parent.num_prompt_tokens - 1
            assert new.seq_index > 0
            mirror = Mirror(list(parent.token_ids), parent.num_prompt_tokens, new.seq_index,
                            parent.sampling, parent.salt, list(new.block_ids),
                            new.num_computed_tokens, list(parent.keys))
        else:
            mirror = Mirror(list(new.token_ids), new.num_prompt_tokens, new.seq_index,
                            new.sampling, self.salts[request_id_of(new.request_id)],
                            list(new.block_ids), new.num_computed_tokens)
            assert 0 < mirror.num_prompt_tokens <= len(mirror.token_ids)
        assert new.num_computed_tokens < len(mirror.token_ids), "nothing left to compute"
        assert len(mirror.block_ids) * self.block_size >= mirror.num_computed
        self.mirrors[new.request_id] = mirror

    def _first_read(self, next_position: int) -> int:
        """The first block a query at `next_position` (or after) reads."""
        if self.window is None:
            return 0
        return max(next_position - self.window + 1, 0) // self.block_size

    def _check_prefix(self, seq_id: str, upto: int, step: int) -> None:
        """Every position the query at `upto` reads holds the sequence's own K/V."""
        mirror, bs = self.mirrors[seq_id], self.block_size
        first = 0 if self.window is None else max(upto - self.window + 1, 0)
        for position in range(first, upto):
            block_id = mirror.block_ids[position // bs]
            found = self.kv.get(block_id, [None] * bs)[position % bs]
            assert found == mirror.key(position), (
                f"step {step}: {seq_id} reads position {position} from block {block_id}, which "
                "does not hold its K/V")

    def _check_shared_blocks_are_full(self, holders: dict[int, set[str]], step: int) -> None:
        """Blocks are shared (prefix hit, fork) only while full of computed tokens."""
        for block_id, seq_ids in holders.items():
            if len(seq_ids) < 2:
                continue
            for seq_id in seq_ids:
                mirror = self.mirrors[seq_id]
                first = self._first_read(mirror.num_computed)
                logical = mirror.block_ids.index(block_id, first)
                assert (logical + 1) * self.block_size <= mirror.num_computed, (
                    f"step {step}: block {block_id} is shared by {sorted(seq_ids)}, not full "
                    f"for {seq_id}")

    def _compute(self, work: executor_pb2.ScheduledWork, holders: dict[int, set[str]],
                 result: executor_pb2.StepResult, step: int
                 ) -> executor_pb2.RequestOutput | None:
        seq_id, bs = work.request_id, self.block_size
        mirror = self.mirrors[seq_id]
        for block_id in work.new_block_ids:
            assert not holders[block_id], f"step {step}: new block {block_id} is still held"
            holders[block_id].add(seq_id)
        mirror.block_ids.extend(work.new_block_ids)
        start, end = mirror.num_computed, mirror.num_computed + work.num_tokens
        assert work.num_tokens >= 1, f"step {step}: {seq_id} scheduled for no tokens"
        assert end <= len(mirror.token_ids), f"step {step}: {seq_id} computes unknown tokens"
        assert end <= self.limits.max_model_len
        assert len(mirror.block_ids) * bs >= end, f"step {step}: {seq_id} lacks blocks"
        assert work.num_lookahead_tokens <= self.limits.num_speculative_tokens
        drafts = []
        if work.num_lookahead_tokens:
            assert work.num_tokens == 1 and end == len(mirror.token_ids), (
                f"step {step}: {seq_id} has a lookahead but does not decode its last token")
            assert not mirror.sampling.disable_spec_decode, (
                f"step {step}: {seq_id} has a lookahead but turned speculation off")
            drafts = self._propose(mirror, work)
            result.num_draft_tokens += len(drafts)
        self._check_prefix(seq_id, start, step)
        keys = [mirror.key(position) for position in range(start, end)]
        for draft in drafts:  # the proposals' K/V, after the known tokens'
            keys.append(kv_key(keys[-1], draft))
        for position, key in enumerate(keys, start=start):
            block_id = mirror.block_ids[position // bs]
            assert holders[block_id] == {seq_id}, (
                f"step {step}: {seq_id} writes block {block_id}, held by "
                f"{sorted(holders[block_id])}")
            self.kv.setdefault(block_id, [None] * bs)[position % bs] = key
        mirror.num_computed = end
        output = executor_pb2.RequestOutput(request_id=seq_id)
        wants_prompt_logprobs = (mirror.sampling.HasField("prompt_logprobs")
                                 and start < mirror.num_prompt_tokens)
        if wants_prompt_logprobs:  # position q predicts the token at q + 1 (runner.py)
            if start == 0:
                output.prompt_logprobs.add()
            for q in range(start, min(end, mirror.num_prompt_tokens - 1)):
                output.prompt_logprobs.append(prompt_logprob(q + 1, mirror.token_ids[q + 1]))
        if end == len(mirror.token_ids):  # computed its last known token: samples
            # At its position and after each proposal; kept while they agree (runner.py).
            for j in range(len(drafts) + 1):
                token = self.model(mirror.token_ids, mirror.num_prompt_tokens,
                                   mirror.seq_index)
                mirror.token_ids.append(token)
                output.token_ids.append(token)
                if mirror.sampling.HasField("logprobs"):
                    output.logprobs.add(chosen=common_pb2.TokenLogprob(token_id=token,
                                                                       logprob=-0.5, rank=1))
                if j == len(drafts) or token != drafts[j]:
                    break
                mirror.num_computed += 1  # the accepted proposal's K/V were computed
        elif not wants_prompt_logprobs:
            return None
        return output


# -- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool = True
    overlap: bool = False
    # Speculative decoding: proposals per decode (0: none) and the batch-size threshold.
    num_speculative_tokens: int = 0
    speculative_disable_by_batch_size: int = 0
    # The model's sliding window (KvCacheInfo.sliding_window); None: full attention.
    sliding_window: int | None = None


@dataclass
class Submitted:
    """A request as its client sees it: what was asked and every delta streamed."""
    request: Request
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    priority: int
    arrival: int
    deltas: list[scheduler_pb2.TokenDelta] = field(default_factory=list)
    # Sequence index -> tokens it had streamed when a stop or abort cut it short.
    cut: dict[int, int] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)
    aborted: bool = False

    def tokens(self, index: int) -> list[int]:
        return [t for d in self.deltas if d.seq_index == index for t in d.token_ids]

    def finish(self, index: int) -> scheduler_pb2.TokenDelta | None:
        return next((d for d in self.deltas if d.seq_index == index and d.finish_reason), None)


class Harness:
    """A StepScheduler, its BlockManager and a SimExecutor, driven like pool_loop.PoolLoop: with
    overlap, plan N + 1 goes out before result N is applied. Checks every plan and result."""

    def __init__(self, config: Config, model: Model = toy_model):
        self.config = config
        self.model = model
        self.limits = StepLimits(config.max_num_seqs, config.max_num_batched_tokens,
                                 config.max_model_len, config.num_speculative_tokens,
                                 config.speculative_disable_by_batch_size)
        self.salts: dict[str, bytes] = {}
        self.submitted: dict[str, Submitted] = {}
        # Tokens each queued sequence had when it was queued: the blocks it claims.
        self.queued_len: dict[str, int] = {}
        # Prefix hit of each admission of each sequence (every executor), in order.
        self.admission_hits: dict[str, list[int]] = defaultdict(list)
        self.plans: list[executor_pb2.StepPlan] = []
        self._new_pool()

    def _new_pool(self) -> None:
        config = self.config
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   config.enable_prefix_caching,
                                   sliding_window=config.sliding_window)
        self.scheduler = StepScheduler(self.blocks, self.limits, eos_token_ids=[EOS])
        self.executor = SimExecutor(config.block_size, self.limits, self.model, self.salts,
                                    config.sliding_window)
        self.in_flight: deque[executor_pb2.StepResult] = deque()
        # What the scheduler's counters should say, counted from the plans.
        self.num_plans = self.num_scheduled_tokens = self.num_preempted = 0

    # -- requests in --------------------------------------------------------------------

    def submit(self, prompt: SequenceType[int], sampling: common_pb2.SamplingParams | None = None,
               priority: int = 0, salt: bytes = b"") -> str:
        sampling = sampling or common_pb2.SamplingParams()
        request_id = f"r{len(self.submitted)}"
        arrival = len(self.submitted)
        max_output = sampling.max_tokens if sampling.HasField("max_tokens") else NO_MAX_TOKENS
        request = Request(request_id=request_id, prompt_token_ids=list(prompt),
                          sampling=sampling, max_output_tokens=max_output, priority=priority,
                          emit=lambda delta: self._on_delta(request_id, delta),
                          cache_salt=salt, arrival=arrival)
        self.salts[request_id] = salt
        self.submitted[request_id] = Submitted(request, list(prompt), sampling, priority,
                                               arrival)
        self.scheduler.add(request)
        first = 1 if request.forks_first else request.n
        for index in range(first):
            self.queued_len[self.seq_id(request_id, index)] = len(prompt)
        return request_id

    def seq_id(self, request_id: str, index: int) -> str:
        return request_id if self.submitted[request_id].request.n == 1 else \
            f"{request_id}/{index}"

    def key(self, seq_id: str) -> tuple[int, int, int]:
        """Queue order as the design states it: priority (lower first), arrival, index."""
        request_id, _, index = seq_id.partition("/")
        sub = self.submitted[request_id]
        return (sub.priority, sub.arrival, int(index or 0))

    def abort(self, request_id: str) -> None:
        sub = self.submitted[request_id]
        for index in range(sub.request.n):
            if sub.finish(index) is None:
                sub.cut[index] = len(sub.tokens(index))
        sub.aborted = True
        self.scheduler.abort(request_id)
        assert request_id not in self.scheduler.requests
        self.check_blocks()

    def stop(self, request_id: str, index: int) -> None:
        """What the gateway does when a stop string matched in sequence `index`'s text."""
        sub = self.submitted[request_id]
        assert sub.finish(index) is None and sub.tokens(index)
        sub.cut[index] = len(sub.tokens(index))
        sub.stopped.add(index)
        num_deltas = len(sub.deltas)
        self.scheduler.stop(request_id, index)
        assert len(sub.deltas) == num_deltas + 1, "stop must emit the final delta at once"
        final = sub.deltas[-1]
        assert (final.seq_index, final.finish_reason, list(final.token_ids)) == (index, STOP, [])
        assert not final.HasField("stop_token_id")
        self.check_blocks()

    def lose_executor(self) -> None:
        """The executor is gone: its sequences are recomputed on a fresh pool."""
        seqs = self.scheduler.take_all()
        # The pool is left empty: nothing to plan, in flight or claimed.
        assert not self.scheduler.has_work and self.scheduler.num_in_flight == 0
        assert self.scheduler.num_unclaimed_free_blocks == self.blocks.num_free_blocks
        self._new_pool()
        self.scheduler.requeue(seqs)
        for seq in seqs:
            self.queued_len[seq.seq_id] = len(seq.token_ids)
        self.check_blocks()

    # -- the loop -----------------------------------------------------------------------

    def advance(self) -> bool:
        """One turn of PoolLoop.run; False when it would sleep (nothing to plan or receive)."""
        max_in_flight = 2 if self.config.overlap else 1
        if len(self.in_flight) < max_in_flight:
            plan = self.schedule()
            if plan is not None and len(self.in_flight) < max_in_flight:
                return True  # overlap: plan the next step before waiting for a result
        if self.in_flight:
            self.process_next()
            return True
        return False

    def schedule(self) -> executor_pb2.StepPlan | None:
        """Plan a step and run it on the executor (its result waits in `in_flight`)."""
        scheduler = self.scheduler
        running_before = list(scheduler.running)
        plan = scheduler.schedule()
        if plan is None:
            return None
        self.plans.append(plan)
        self._check_plan(plan, running_before)
        for new in plan.new_requests:
            if not new.fork_of:
                self.admission_hits[new.request_id].append(new.num_computed_tokens)
        self.in_flight.append(self.executor.run(plan))
        self._check_mirrors()
        self.check_blocks()
        return plan

    def process_next(self) -> executor_pb2.StepResult:
        result = self.in_flight.popleft()
        assert self.scheduler.process(result) == {}
        self.check_blocks()
        return result

    def run(self, max_turns: int = 20_000) -> None:
        for _ in range(max_turns):
            if not self.advance():
                break
        else:
            raise AssertionError(f"no end after {max_turns} turns of the loop")
        running = self.scheduler.running
        assert not (running and all(_waits_to_fork(seq) for seq in running)), \
            f"deadlock: {[s.seq_id for s in running]} all wait to fork"
        assert not self.scheduler.has_work, "stalled: work left, yet nothing was planned"

    # -- checks -------------------------------------------------------------------------

    def _check_plan(self, plan: executor_pb2.StepPlan, running_before: list[Sequence]) -> None:
        scheduler, limits = self.scheduler, self.limits
        forked_and_dropped = {new.request_id for new in plan.new_requests if new.fork_of} & set(
            plan.dropped_request_ids)
        assert not forked_and_dropped, \
            f"step {plan.step_id} forks and drops {sorted(forked_and_dropped)}"
        tokens = sum(w.num_tokens + w.num_lookahead_tokens for w in plan.work)
        assert tokens <= limits.max_num_batched_tokens
        threshold = limits.speculative_disable_by_batch_size
        if threshold and len(running_before) > threshold:
            assert not any(w.num_lookahead_tokens for w in plan.work), (
                f"step {plan.step_id} speculates with {len(running_before)} running")
        assert len(plan.work) <= limits.max_num_seqs
        self.num_plans += 1
        self.num_scheduled_tokens += tokens
        counters = scheduler.counters
        assert (counters.steps, counters.scheduled_tokens) == (self.num_plans,
                                                               self.num_scheduled_tokens)
        victims = [s for s in running_before if s.state is SeqState.WAITING]
        self.num_preempted += len(victims)
        assert counters.preemptions == self.num_preempted
        dropped = list(plan.dropped_request_ids)
        assert len(dropped) == len(set(dropped))
        for victim in victims:
            assert victim.seq_id in dropped, f"preempted {victim.seq_id} is not dropped"
            assert victim.seq_id in self.executor.mirrors  # it was on the executor
            self.queued_len[victim.seq_id] = len(victim.token_ids)
        admitted = [new.request_id for new in plan.new_requests if not new.fork_of]
        if victims:
            assert not admitted, f"a step that preempts admitted {admitted}"
        waiting_keys = [self.key(s.seq_id) for s in scheduler.waiting]
        if admitted and waiting_keys:  # admitted in queue order, none skipped
            assert max(map(self.key, admitted)) < min(waiting_keys), (
                f"admitted {admitted} before waiting "
                f"{[s.seq_id for s in scheduler.waiting]}")
        # Each victim was the latest in queue order of the sequences not planned when it was
        # picked: those still running unplanned (children forked in this step aside) sort
        # before it.
        planned = {w.request_id for w in plan.work} | {
            new.request_id for new in plan.new_requests if new.fork_of}
        for seq in scheduler.running:
            if seq.seq_id not in planned:
                for victim in victims:
                    assert self.key(seq.seq_id) < self.key(victim.seq_id), (
                        f"preempted {victim.seq_id} while {seq.seq_id} sorts after it")

    def _check_mirrors(self) -> None:
        """The executor's mirrors are the running sequences, with the scheduler's tables."""
        running = {s.seq_id: s for s in self.scheduler.running}
        assert set(self.executor.mirrors) == set(running)
        # Proposals accepted in steps whose results the scheduler has not applied yet: the
        # executor has computed and appended them, the scheduler does not know them yet.
        pending: dict[str, int] = defaultdict(int)
        for result in self.in_flight:
            for output in result.outputs:
                pending[output.request_id] += max(0, len(output.token_ids) - 1)
        for seq_id, seq in running.items():
            mirror = self.executor.mirrors[seq_id]
            # The executor's table, but for the entries the scheduler released since (sent
            # as block 0 where a new request or fork carried them).
            table = self.blocks.block_table(seq_id)
            released = len(table) - self.blocks.num_held_blocks(seq_id)
            assert len(mirror.block_ids) == len(table), seq_id
            assert mirror.block_ids[released:] == table[released:], seq_id
            assert mirror.num_computed == seq.num_computed + pending[seq_id], seq_id
            # Known to the executor: the accepted tokens plus those sampled in steps whose
            # results have not been applied yet.
            assert len(mirror.token_ids) == seq.num_known_tokens + pending[seq_id], seq_id
            assert mirror.token_ids[:len(seq.token_ids)] == seq.token_ids, seq_id

    def check_blocks(self) -> None:
        self.blocks.check_invariants()
        bs = self.config.block_size
        claimed = sum(-(-self.queued_len[s.seq_id] // bs) for s in self.scheduler.waiting)
        assert self.scheduler.num_unclaimed_free_blocks == self.blocks.num_free_blocks - claimed

    def _on_delta(self, request_id: str, delta: scheduler_pb2.TokenDelta) -> None:
        sub = self.submitted[request_id]
        assert not sub.aborted, f"{request_id} streamed after its abort"
        assert delta.seq_index < sub.request.n
        assert sub.finish(delta.seq_index) is None, (
            f"{request_id}/{delta.seq_index} streamed after it finished")
        first = not sub.deltas
        assert delta.num_prompt_tokens == (len(sub.prompt) if first else 0)
        if first and sub.sampling.HasField("prompt_logprobs"):
            assert list(delta.prompt_logprobs) == expected_prompt_logprobs(sub.prompt)
            assert delta.num_cached_prompt_tokens == 0  # computed for their logits
        elif first:
            assert not delta.prompt_logprobs
            hits = self.admission_hits[self.seq_id(request_id, 0)]
            if len(hits) == 1:  # unambiguous: sequence 0 was admitted once
                assert delta.num_cached_prompt_tokens == hits[0]
        else:
            assert not delta.prompt_logprobs and not delta.num_cached_prompt_tokens
        if sub.sampling.HasField("logprobs"):
            assert [lp.chosen.token_id for lp in delta.logprobs] == list(delta.token_ids)
        else:
            assert not delta.logprobs
        sub.deltas.append(delta)

    def expected(self, request_id: str, index: int = 0) -> Generation:
        sub = self.submitted[request_id]
        return reference_generation(sub.prompt, sub.sampling, index, self.config.max_model_len,
                                    self.model)

    def check_outcomes(self) -> None:
        """After `run`: every request streamed its reference, or a prefix of it where a stop or
        abort cut it short, and nothing is left held anywhere."""
        scheduler, blocks = self.scheduler, self.blocks
        assert not self.in_flight and not self.executor.mirrors
        assert not (scheduler.waiting or scheduler.running or scheduler.by_id
                    or scheduler.requests)
        assert scheduler.num_in_flight == 0
        assert (blocks.num_free_blocks, blocks.num_used_blocks) == (blocks.num_blocks, 0)
        assert scheduler.num_unclaimed_free_blocks == blocks.num_blocks
        for request_id, sub in self.submitted.items():
            for index in range(sub.request.n):
                self._check_outcome(request_id, sub, index)

    def _check_outcome(self, request_id: str, sub: Submitted, index: int) -> None:
        name = f"{request_id}/{index}"
        expected, tokens, final = self.expected(request_id, index), sub.tokens(index), \
            sub.finish(index)
        if index not in sub.cut:
            assert tuple(tokens) == expected.token_ids, name
            assert final is not None and final.finish_reason == expected.finish_reason, name
            stop_token = final.stop_token_id if final.HasField("stop_token_id") else None
            assert stop_token == expected.stop_token_id, name
            return
        assert len(tokens) == sub.cut[index], f"{name} streamed after a stop or abort"
        assert tuple(tokens) == expected.token_ids[:len(tokens)], name
        if index in sub.stopped:
            assert final is not None and final.finish_reason == STOP, name
        else:
            assert final is None, f"{name}: an abort streams no final delta"


def sampling_params(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


def harness(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
            max_num_batched_tokens: int = 64, max_model_len: int = 64,
            enable_prefix_caching: bool = True, overlap: bool = False,
            model: Model = toy_model, speculative: int = 0,
            disable_by_batch_size: int = 0, sliding_window: int | None = None) -> Harness:
    return Harness(Config(num_blocks, block_size, max_num_seqs, max_num_batched_tokens,
                          max_model_len, enable_prefix_caching, overlap, speculative,
                          disable_by_batch_size, sliding_window), model)


def prompt_of(length: int, start: int = 2) -> list[int]:
    """A prompt of `length` tokens (cycling through the vocabulary, EOS included)."""
    return [(start + i) % VOCAB for i in range(length)]


def work_tokens(plan: executor_pb2.StepPlan) -> dict[str, int]:
    return {w.request_id: w.num_tokens for w in plan.work}


# -- chunked prefill: the budget and the chunk cap -------------------------------------------


def test_a_prefill_alone_takes_the_whole_budget():
    h = harness(max_num_batched_tokens=16)
    rid = h.submit(prompt_of(40), sampling_params(max_tokens=2, ignore_eos=True))
    chunks = []
    while (plan := h.schedule()) is not None:
        chunks.append(work_tokens(plan).get(rid))
        h.process_next()
    assert chunks[:3] == [16, 16, 8]  # then decodes, then the drop
    h.check_outcomes()


@pytest.mark.parametrize(("budget", "cap"), [(16, 4), (19, 4), (20, 5), (3, 1)])
def test_a_long_prompt_takes_a_quarter_of_the_budget_while_a_short_one_waits(budget: int,
                                                                            cap: int):
    h = harness(max_num_batched_tokens=budget)
    a = h.submit(prompt_of(40), sampling_params(max_tokens=1))
    # Short: no more than max(1, budget // 4) tokens, exactly that many here.
    b = h.submit(prompt_of(cap, start=5), sampling_params(max_tokens=1))
    assert work_tokens(h.schedule()) == {a: cap, b: cap}
    h.process_next()
    assert work_tokens(h.schedule()) == {a: budget}  # b finished: a alone takes it all
    h.process_next()
    h.run()
    h.check_outcomes()


def test_prompts_longer_than_a_quarter_of_the_budget_go_first_come_first_served():
    """Side by side they would all finish late together; in turn the first finishes first."""
    h = harness(max_num_batched_tokens=16)  # a quarter: 4
    a = h.submit(prompt_of(12), sampling_params(max_tokens=1))
    b = h.submit(prompt_of(5, start=5), sampling_params(max_tokens=1))  # one over a quarter
    c = h.submit(prompt_of(30, start=9), sampling_params(max_tokens=1))
    assert work_tokens(h.schedule()) == {a: 12, b: 4}
    h.process_next()
    assert work_tokens(h.schedule()) == {b: 1, c: 15}  # b's last token goes first, as decodes
    h.process_next()
    assert work_tokens(h.schedule()) == {c: 15}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_running_long_prefill_makes_room_for_a_short_prompt_only():
    h = harness(max_num_batched_tokens=16)
    a = h.submit(prompt_of(60), sampling_params(max_tokens=1))
    assert work_tokens(h.schedule()) == {a: 16}  # alone: the whole budget
    h.process_next()
    b = h.submit(prompt_of(4, start=7), sampling_params(max_tokens=1))  # a quarter: short
    assert work_tokens(h.schedule()) == {a: 4, b: 4}
    h.process_next()
    c = h.submit(prompt_of(5, start=9), sampling_params(max_tokens=1))  # not short: it waits
    for a_chunk in (16, 16):
        assert work_tokens(h.schedule()) == {a: a_chunk}
        h.process_next()
    assert work_tokens(h.schedule()) == {a: 8, c: 5}  # the rest of a's 60 tokens, then c
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_decode_does_not_make_a_lone_prefill_contend():
    h = harness(max_num_batched_tokens=16)
    a = h.submit(prompt_of(3), sampling_params(max_tokens=5, ignore_eos=True))
    assert work_tokens(h.schedule()) == {a: 3}
    h.process_next()
    b = h.submit(prompt_of(40, start=9), sampling_params(max_tokens=1))
    # The decode goes first; the one prefill takes all the rest of the budget.
    assert work_tokens(h.schedule()) == {a: 1, b: 15}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_chunk_never_takes_more_than_the_budget_left():
    h = harness(max_num_seqs=9, max_num_batched_tokens=8)  # contended chunks: 2 tokens
    decoding = [h.submit([i], sampling_params(max_tokens=4, ignore_eos=True)) for i in range(7)]
    h.schedule()
    h.process_next()
    a = h.submit(prompt_of(10), sampling_params(max_tokens=1))
    h.submit(prompt_of(10, start=5), sampling_params(max_tokens=1))
    plan = h.schedule()  # 7 decodes leave 1 token: the first prompt's chunk is 1, not 2
    assert work_tokens(plan) == {**{rid: 1 for rid in decoding}, a: 1}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_the_sequence_limit_bounds_a_step():
    h = harness(max_num_seqs=2, max_num_batched_tokens=64)
    ids = [h.submit(prompt_of(3, start=i), sampling_params(max_tokens=3, ignore_eos=True))
           for i in range(3)]
    plan = h.schedule()
    assert [new.request_id for new in plan.new_requests] == ids[:2]
    assert work_tokens(plan) == {ids[0]: 3, ids[1]: 3}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_the_waiting_queue_runs_in_priority_then_arrival_order():
    h = harness(max_num_seqs=1)
    ids = [h.submit(prompt_of(3, start=i), sampling_params(max_tokens=1), priority=p)
           for i, p in enumerate([2, 0, 1, 0, -1])]
    admitted = []
    while (plan := h.schedule()) is not None:
        admitted += [new.request_id for new in plan.new_requests]
        h.process_next()
    assert admitted == [ids[4], ids[1], ids[3], ids[2], ids[0]]
    h.check_outcomes()


def test_a_decode_goes_before_a_prefill_admitted_earlier():
    h = harness(max_num_batched_tokens=8)
    a = h.submit(prompt_of(40), sampling_params(max_tokens=1))
    assert work_tokens(h.schedule()) == {a: 8}
    h.process_next()
    b = h.submit(prompt_of(2, start=9), sampling_params(max_tokens=4, ignore_eos=True))
    assert work_tokens(h.schedule()) == {a: 2, b: 2}  # contended: a quarter each
    h.process_next()
    plan = h.schedule()  # b decodes first, though a runs ahead of it; a has the rest
    assert [(w.request_id, w.num_tokens) for w in plan.work] == [(b, 1), (a, 7)]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_running_prefill_with_two_tokens_left_is_a_short_prompt():
    """Eight decodes leave four tokens of a 12-token budget: the long prompt takes a quarter
    (3) while the short one, admitted behind it, gets what is left (1). With two tokens left
    the short one is still a prompt, so the long one stays at a quarter and the short one
    gets its token; with one left it is a decode, and goes first."""
    h = harness(max_num_seqs=16, max_num_batched_tokens=12)
    decoding = [h.submit([i + 2], sampling_params(max_tokens=8, ignore_eos=True))
                for i in range(8)]
    h.schedule()
    h.process_next()
    long = h.submit(prompt_of(40, start=20), sampling_params(max_tokens=1))
    short = h.submit(prompt_of(3, start=70), sampling_params(max_tokens=1))
    decodes = {rid: 1 for rid in decoding}
    for _ in range(2):
        assert work_tokens(h.schedule()) == {**decodes, long: 3, short: 1}
        h.process_next()
    plan = h.schedule()
    assert [w.request_id for w in plan.work] == [*decoding, short, long]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_decodes_that_spend_the_budget_leave_a_prefill_for_the_next_step():
    """A fork of n = 4 makes four decodes for a 4-token budget: the running prefill gets no
    work in that step (not work of 0 tokens, which the executor refuses), then goes on."""
    h = harness(max_num_batched_tokens=4)
    r = h.submit(prompt_of(3), sampling_params(n=4, max_tokens=2, ignore_eos=True))
    p = h.submit(prompt_of(20, start=5), sampling_params(max_tokens=1))
    # r/0 prefills the prompt but its last token, first come, first served.
    assert work_tokens(h.schedule()) == {f"{r}/0": 2, p: 2}
    h.process_next()
    plan = h.schedule()  # r/0 forks and computes its last prompt token
    assert [n.fork_of for n in plan.new_requests] == [f"{r}/0"] * 3
    assert work_tokens(plan) == {f"{r}/0": 1, p: 3}
    h.process_next()
    assert work_tokens(h.schedule()) == {f"{r}/{i}": 1 for i in range(4)}
    h.process_next()
    assert p in work_tokens(h.schedule())
    h.process_next()
    h.run()
    h.check_outcomes()



# -- preemption ------------------------------------------------------------------------------


def preemption_setup(priorities: tuple[int, int, int]) -> tuple[Harness, list[str]]:
    """Three requests decoding on a pool of five 4-token blocks, one left free. The first two
    prompts take one block each, the third two; all need a new block at their next token."""
    h = harness(num_blocks=5, block_size=4)
    sampling = sampling_params(max_tokens=8, ignore_eos=True)
    ids = [h.submit(prompt_of(4, start=1), sampling, priority=priorities[0]),
           h.submit(prompt_of(4, start=2), sampling, priority=priorities[1]),
           h.submit(prompt_of(8, start=3), sampling, priority=priorities[2])]
    plan = h.schedule()
    assert len(plan.new_requests) == 3 and h.blocks.num_free_blocks == 1
    h.process_next()
    return h, ids


def test_a_step_that_preempts_admits_nothing():
    h, (a, b, c) = preemption_setup(priorities=(0, 1, 5))
    assert [s.seq_id for s in h.scheduler.running] == [a, b, c]
    late = h.submit(prompt_of(3, start=11), sampling_params(max_tokens=2), priority=0)
    plan = h.schedule()
    # a takes the free block; b finds none: of b and c (not yet planned), c goes.
    assert list(plan.dropped_request_ids) == [c]
    assert work_tokens(plan) == {a: 1, b: 1}
    # c freed two blocks and b took one: the late request would fit, but a step that
    # preempts admits nothing.
    assert h.blocks.num_free_blocks == 1 and not plan.new_requests
    assert h.scheduler.counters.preemptions == 1
    assert [s.seq_id for s in h.scheduler.waiting] == [late, c]
    h.process_next()
    plan = h.schedule()
    assert [new.request_id for new in plan.new_requests] == [late]
    h.process_next()
    h.run()
    h.check_outcomes()  # c, recomputed from its prompt and tokens, went on where it was


def test_preemption_takes_the_lowest_priority_even_if_it_arrived_first():
    h, (a, b, c) = preemption_setup(priorities=(5, 0, 0))
    assert [s.seq_id for s in h.scheduler.running] == [b, c, a]  # admitted in queue order
    plan = h.schedule()
    # b takes the free block; c finds none: of c and a, a (priority 5) goes, not c.
    assert list(plan.dropped_request_ids) == [a]
    assert work_tokens(plan) == {b: 1, c: 1}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_preemption_among_equal_priorities_takes_the_latest_arrival():
    h, (a, b, c) = preemption_setup(priorities=(0, 0, 0))
    plan = h.schedule()
    assert list(plan.dropped_request_ids) == [c]
    assert work_tokens(plan) == {a: 1, b: 1}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_sequence_planned_earlier_in_the_step_is_never_the_victim():
    h = harness(num_blocks=3, block_size=4)
    sampling = sampling_params(max_tokens=6, ignore_eos=True)
    x = h.submit(prompt_of(4, start=1), sampling, priority=5)
    h.schedule()
    h.process_next()
    y = h.submit(prompt_of(4, start=2), sampling, priority=0)
    h.schedule()  # x takes its second block, y its first: the pool is full
    h.process_next()
    plan = h.schedule()
    # x (priority 5) was planned first; y then needs a block and, the only unplanned one,
    # gives its own back rather than x's.
    assert list(plan.dropped_request_ids) == [y] and work_tokens(plan) == {x: 1}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_the_sequence_asking_for_a_block_preempts_itself_when_it_sorts_last():
    h = harness(num_blocks=3, block_size=4)
    sampling = sampling_params(max_tokens=6, ignore_eos=True)
    a = h.submit(prompt_of(4, start=1), sampling)
    b = h.submit(prompt_of(4, start=2), sampling)
    h.schedule()
    h.process_next()
    plan = h.schedule()  # a takes the last block; b, alone unplanned, gives its own back
    assert list(plan.dropped_request_ids) == [b] and work_tokens(plan) == {a: 1}
    assert h.scheduler.by_id[b].state is SeqState.WAITING
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_sequence_preempted_earlier_in_a_step_leaves_the_rest_of_it():
    """x's next token needs a block, and the pool is full: v (priority 1) is preempted. The
    loop then passes v and goes on to z's prefill chunk, which fits in z's block."""
    h = harness(num_blocks=3, block_size=4, max_num_batched_tokens=3)
    sampling = sampling_params(max_tokens=8, ignore_eos=True)
    x = h.submit(prompt_of(2), sampling)
    v = h.submit(prompt_of(2, start=5), sampling, priority=1)
    assert work_tokens(h.schedule()) == {x: 2, v: 1}
    h.process_next()
    z = h.submit(prompt_of(8, start=7), sampling_params(max_tokens=1))
    for _ in range(2):  # x fills its block; z's prefill takes the last one
        assert work_tokens(h.schedule()) == {x: 1, v: 1, z: 1}
        h.process_next()
    plan = h.schedule()
    assert list(plan.dropped_request_ids) == [v]
    assert work_tokens(plan) == {x: 1, z: 2}
    h.process_next()
    h.run()
    h.check_outcomes()



def test_a_sequence_that_preempts_itself_leaves_the_rest_of_the_step():
    """s (priority 1) runs ahead of z but sorts after it: when s's next token finds no block,
    s gives its own back, and z, after it in the pass, still decodes."""
    h = harness(num_blocks=2, block_size=4)
    sampling = sampling_params(max_tokens=4, ignore_eos=True)
    s = h.submit(prompt_of(3), sampling, priority=1)
    h.schedule()
    h.process_next()
    z = h.submit(prompt_of(2, start=5), sampling)
    assert work_tokens(h.schedule()) == {s: 1, z: 2}
    h.process_next()
    plan = h.schedule()
    assert list(plan.dropped_request_ids) == [s] and work_tokens(plan) == {z: 1}
    h.process_next()
    h.run()
    h.check_outcomes()



# -- what a result means: stop rules, limits, several tokens ----------------------------------


@pytest.mark.parametrize(("outputs", "fields", "max_model_len", "streamed", "reason", "stop"), [
    # EOS and stop tokens are plain tokens until min_tokens are out, then end it at once.
    ([EOS, 5, EOS, EOS, 6], dict(min_tokens=3), 64, [EOS, 5, EOS], STOP, EOS),
    ([2, 2, 2, 5], dict(min_tokens=2, stop_token_ids=[2]), 64, [2, 2], STOP, 2),
    ([4, 3, 5], dict(stop_token_ids=[3]), 64, [4], STOP, 3),
    ([EOS, EOS, 3, 5], dict(ignore_eos=True, stop_token_ids=[3]), 64, [EOS, EOS], STOP, 3),
    # max_tokens: exactly that many, ending with LENGTH; an EOS within it still stops.
    ([4, 5, 6, 7], dict(max_tokens=3), 64, [4, 5, 6], LENGTH, None),
    ([4, 5, 6, 7], dict(max_tokens=1), 64, [4], LENGTH, None),
    ([4, 5, EOS, 7], dict(max_tokens=3), 64, [4, 5], STOP, EOS),
    ([EOS, EOS, EOS], dict(min_tokens=5, max_tokens=2), 64, [EOS, EOS], LENGTH, None),
    # The context limit (a prompt of 5, max_model_len 8) ends it with LENGTH at exactly 8.
    ([4] * 8, dict(ignore_eos=True), 8, [4, 4, 4], LENGTH, None),
    ([4] * 8, dict(max_tokens=10), 8, [4, 4, 4], LENGTH, None),
    ([4, 4, EOS, 4], dict(), 8, [4, 4], STOP, EOS),
])
@pytest.mark.parametrize("overlap", [False, True])
def test_how_a_sequence_ends(outputs, fields, max_model_len, streamed, reason, stop, overlap):
    h = harness(max_model_len=max_model_len, overlap=overlap, model=scripted(outputs))
    rid = h.submit(prompt_of(5), sampling_params(**fields, logprobs=0))
    assert h.expected(rid) == Generation(tuple(streamed), reason, stop)  # the reference
    h.run()
    h.check_outcomes()
    final = h.submitted[rid].finish(0)
    assert h.submitted[rid].tokens(0) == streamed and final.finish_reason == reason
    assert final.HasField("stop_token_id") == (stop is not None)


def standalone(num_blocks: int = 16, max_model_len: int = 64,
               speculative: int = 0) -> StepScheduler:
    return StepScheduler(BlockManager(num_blocks, 4),
                         StepLimits(4, 64, max_model_len, speculative), [EOS])


def make_request(request_id: str, prompt: list[int], sampling: common_pb2.SamplingParams,
                 deltas: list[scheduler_pb2.TokenDelta], priority: int = 0) -> Request:
    max_output = sampling.max_tokens if sampling.HasField("max_tokens") else NO_MAX_TOKENS
    return Request(request_id=request_id, prompt_token_ids=prompt, sampling=sampling,
                   max_output_tokens=max_output, priority=priority, emit=deltas.append)


def several_tokens(request_id: str, tokens: list[int]) -> executor_pb2.StepResult:
    """A result with several sampled tokens in one output (speculative decoding)."""
    logprobs = [common_pb2.PositionLogprobs(chosen=common_pb2.TokenLogprob(token_id=t))
                for t in tokens]
    return executor_pb2.StepResult(step_id=1, outputs=[executor_pb2.RequestOutput(
        request_id=request_id, token_ids=tokens, logprobs=logprobs)])


@pytest.mark.parametrize(("fields", "tokens", "streamed", "reason"), [
    (dict(), [5, EOS, 6], [5], STOP),
    (dict(max_tokens=2), [5, 6, 7], [5, 6], LENGTH),
    (dict(min_tokens=2), [EOS, EOS, EOS, 6], [EOS, EOS], STOP),
    (dict(), [5, 6, 7], [5, 6, 7], UNFINISHED),
])
def test_several_tokens_in_one_output_are_cut_at_the_end(fields, tokens, streamed, reason):
    scheduler, deltas = standalone(max_model_len=64, speculative=3), []
    scheduler.add(make_request("r", prompt_of(3), sampling_params(**fields, logprobs=0),
                               deltas))
    scheduler.schedule()
    scheduler.process(several_tokens("r", tokens))
    (delta,) = deltas
    assert list(delta.token_ids) == streamed and delta.finish_reason == reason
    assert [lp.chosen.token_id for lp in delta.logprobs] == streamed
    assert (scheduler.blocks.num_free_blocks == 16) == (reason != UNFINISHED)


def test_several_tokens_stop_at_the_context_limit():
    scheduler, deltas = standalone(max_model_len=5, speculative=2), []
    scheduler.add(make_request("r", prompt_of(3), sampling_params(), deltas))
    scheduler.schedule()
    scheduler.process(several_tokens("r", [5, 6, 7]))
    assert [(list(d.token_ids), d.finish_reason) for d in deltas] == [([5, 6], LENGTH)]


# -- block accounting -------------------------------------------------------------------------


def test_unclaimed_free_blocks_are_free_blocks_less_what_waiting_sequences_need():
    h = harness(num_blocks=16, block_size=4, max_num_seqs=3)
    unclaimed = lambda: h.scheduler.num_unclaimed_free_blocks  # noqa: E731
    assert unclaimed() == 16
    a = h.submit(prompt_of(5), sampling_params(max_tokens=2))  # 2 blocks
    assert unclaimed() == 14
    b = h.submit(prompt_of(8), sampling_params(max_tokens=2))  # 2 blocks, exactly full
    assert unclaimed() == 12
    c = h.submit(prompt_of(9), sampling_params(n=3, max_tokens=2))  # one sequence until it forks
    assert unclaimed() == 9
    d = h.submit(prompt_of(1), sampling_params(n=2, max_tokens=2))  # two sequences of 1 token
    assert unclaimed() == 7
    h.abort(b)  # a waiting request leaves: its claim goes
    assert unclaimed() == 9
    plan = h.schedule()  # three start (a place each): their blocks taken, no longer claimed
    assert [new.request_id for new in plan.new_requests] == [a, f"{c}/0", f"{d}/0"]
    assert work_tokens(plan) == {a: 5, f"{c}/0": 8, f"{d}/0": 1}
    assert h.blocks.num_free_blocks == 16 - 2 - 2 - 1 and unclaimed() == 11 - 1
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_preempted_sequence_claims_its_prompt_and_generated_tokens():
    h, (a, b, c) = preemption_setup(priorities=(0, 0, 0))
    h.schedule()  # c (8 prompt tokens + 1 generated) preempted
    assert h.scheduler.num_unclaimed_free_blocks == h.blocks.num_free_blocks - 3
    h.process_next()
    h.run()
    h.check_outcomes()


def test_nothing_to_do_plans_nothing():
    h = harness()
    assert h.scheduler.schedule() is None and not h.scheduler.has_work
    rid = h.submit(prompt_of(3), sampling_params(max_tokens=1))
    assert h.scheduler.has_work
    h.run()
    assert h.scheduler.schedule() is None and not h.scheduler.has_work
    h.check_outcomes()
    assert h.submitted[rid].finish(0).finish_reason == LENGTH


# -- overlapped steps, aborts, stops, refusals --------------------------------------------------


def test_a_result_for_a_sequence_finished_meanwhile_is_discarded():
    h = harness(overlap=True, model=scripted([EOS, 7, 8]))
    rid = h.submit(prompt_of(3))
    h.schedule()  # step 1: the prompt; samples EOS
    plan = h.schedule()  # step 2, before result 1: computes EOS's position, samples 7
    assert work_tokens(plan) == {rid: 1} and h.scheduler.num_in_flight == 2
    h.process_next()  # result 1: EOS ends it
    sub = h.submitted[rid]
    assert [(list(d.token_ids), d.finish_reason, d.stop_token_id) for d in sub.deltas] == [
        ([], STOP, EOS)]
    assert h.blocks.num_free_blocks == h.blocks.num_blocks  # freed before the next plan
    result = h.process_next()
    assert [list(o.token_ids) for o in result.outputs] == [[7]]  # computed, never streamed
    assert len(sub.deltas) == 1
    plan = h.schedule()
    assert list(plan.dropped_request_ids) == [rid] and not plan.work
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_sequence_preempted_with_a_sample_in_flight_waits_for_it():
    # Three plans in flight (deeper than the pool loop goes): b is preempted in step 2 while
    # its step-1 token is unseen, and must not restart before that token is known.
    h = harness(num_blocks=4, block_size=4)
    sampling = sampling_params(max_tokens=4, ignore_eos=True)
    a = h.submit(prompt_of(4, start=1), sampling)
    c = h.submit(prompt_of(4, start=2), sampling)
    b = h.submit(prompt_of(4, start=3), sampling, priority=1)
    h.schedule()  # one block each, one left
    plan = h.schedule()  # a takes it; c finds none: b (priority 1) goes
    assert list(plan.dropped_request_ids) == [b] and work_tokens(plan) == {a: 1, c: 1}
    assert h.scheduler.by_id[b].num_in_flight == 1
    h.abort(c)  # room again, before any result
    plan = h.schedule()
    assert not plan.new_requests  # b waits for its token in flight
    for _ in range(3):
        h.process_next()
    plan = h.schedule()
    assert [(n.request_id, len(n.token_ids)) for n in plan.new_requests] == [(b, 5)]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_abort_frees_blocks_at_once_and_drops_only_what_the_executor_holds():
    h = harness(max_num_seqs=2, overlap=True)
    sampling = sampling_params(max_tokens=20, ignore_eos=True)
    a = h.submit(prompt_of(10), sampling)
    b = h.submit(prompt_of(3, start=7), sampling)
    c = h.submit(prompt_of(6, start=4), sampling)  # waits: two sequences at most
    h.schedule()
    h.schedule()  # two steps in flight
    held = len(h.blocks.block_table(a))
    free, unclaimed = h.blocks.num_free_blocks, h.scheduler.num_unclaimed_free_blocks
    h.abort(a)
    assert h.blocks.num_free_blocks == free + held
    h.abort(c)
    assert h.scheduler.num_unclaimed_free_blocks == unclaimed + held + 2
    h.process_next()
    h.process_next()  # a's samples of both steps: discarded
    plan = h.schedule()
    assert list(plan.dropped_request_ids) == [a]  # c never reached the executor
    assert not h.submitted[a].deltas and not h.submitted[c].deltas
    h.abort(a)  # again: nothing
    h.run()
    h.check_outcomes()
    assert len(h.submitted[b].tokens(0)) == 20


def test_stop_ends_one_sequence_and_the_others_go_on():
    h = harness(block_size=4)
    rid = h.submit(prompt_of(6), sampling_params(n=2, max_tokens=8, ignore_eos=True))
    sub = h.submitted[rid]
    while len(sub.tokens(1)) < 2:
        assert h.advance()
    held = h.blocks.block_table(f"{rid}/1")
    free = h.blocks.num_free_blocks
    h.stop(rid, 1)
    # Its own blocks are free at once; the prompt block it shares with sequence 0 is not.
    assert h.blocks.num_free_blocks == free + sum(h.blocks.ref_count(b) == 0 for b in held)
    assert h.blocks.num_free_blocks > free
    num_deltas = len(sub.deltas)
    h.scheduler.stop(rid, 1)  # a stopped sequence: nothing more happens
    assert len(sub.deltas) == num_deltas
    plan = h.schedule()
    assert f"{rid}/1" in plan.dropped_request_ids
    h.process_next()
    h.run()
    h.check_outcomes()  # sequence 0 generated all of its tokens
    num_deltas = len(sub.deltas)
    h.scheduler.stop(rid, 0)  # a finished request: nothing
    assert len(sub.deltas) == num_deltas


def test_a_refused_request_is_aborted_and_the_others_go_on():
    scheduler, deltas_a, deltas_b = standalone(), [], []
    sampling = sampling_params(max_tokens=3, ignore_eos=True)
    scheduler.add(make_request("a", prompt_of(5), sampling, deltas_a))
    scheduler.add(make_request("b", prompt_of(5, start=8), sampling, deltas_b))
    scheduler.schedule()
    result = executor_pb2.StepResult(
        step_id=1, failed_requests=[executor_pb2.RequestFailure(request_id="gone", message="?"),
                                    executor_pb2.RequestFailure(request_id="a", message="bad")],
        outputs=[executor_pb2.RequestOutput(request_id="b", token_ids=[9])])
    assert scheduler.process(result) == {"a": "bad"}
    assert "a" not in scheduler.requests and not deltas_a
    assert list(deltas_b[0].token_ids) == [9]
    assert scheduler.blocks.num_free_blocks == 16 - 2  # b's two blocks only
    # A second refusal of a sequence already gone is no news.
    assert scheduler.process(executor_pb2.StepResult(
        step_id=1, failed_requests=result.failed_requests)) == {}
    plan = scheduler.schedule()
    assert not plan.dropped_request_ids  # the executor has no mirror of a to drop
    assert [w.request_id for w in plan.work] == ["b"]


def test_requests_go_on_after_their_executor_is_lost():
    h = harness(num_blocks=24, block_size=4, max_num_batched_tokens=8, overlap=True)
    for i, n in enumerate([1, 2, 1, 3]):
        h.submit(prompt_of(5 + 3 * i, start=i), sampling_params(n=n, max_tokens=6))
    for _ in range(9):
        h.advance()
    assert h.in_flight and h.scheduler.running
    h.lose_executor()
    h.run()
    h.check_outcomes()


# -- prefix caching and forks --------------------------------------------------------------------


def test_a_prefix_hit_skips_the_cached_blocks():
    h = harness(block_size=4)
    prompt = prompt_of(10)
    h.submit(prompt, sampling_params(max_tokens=1))
    h.run()
    rid = h.submit([*prompt, 3], sampling_params(max_tokens=2))
    plan = h.schedule()
    assert plan.new_requests[0].num_computed_tokens == 8 and work_tokens(plan) == {rid: 3}
    h.process_next()
    h.run()
    h.check_outcomes()
    assert h.submitted[rid].deltas[0].num_cached_prompt_tokens == 8


def test_prefix_hits_only_between_requests_of_one_cache_salt():
    h = harness(block_size=4)
    prompt = prompt_of(10)
    h.submit(prompt, sampling_params(max_tokens=1), salt=b"alice")
    h.run()
    hits = {}
    for salt in (b"bob", b"", b"alice"):
        h.submit(prompt, sampling_params(max_tokens=1), salt=salt)
        hits[salt] = h.schedule().new_requests[0].num_computed_tokens
        h.run()
    assert hits == {b"bob": 0, b"": 0, b"alice": 8}
    h.check_outcomes()


def test_prompt_logprobs_bypass_the_prefix_cache():
    h = harness(block_size=4)
    prompt = prompt_of(10)
    h.submit(prompt, sampling_params(max_tokens=1))
    h.run()
    rid = h.submit(prompt, sampling_params(max_tokens=1, prompt_logprobs=0))
    plan = h.schedule()
    # 8 tokens are cached, but a cached prefix has no logits: all 10 are computed.
    assert plan.new_requests[0].num_computed_tokens == 0 and work_tokens(plan) == {rid: 10}
    h.process_next()
    after = h.submit(prompt, sampling_params(max_tokens=1))
    h.run()
    h.check_outcomes()
    first = h.submitted[rid].deltas[0]
    assert list(first.prompt_logprobs) == expected_prompt_logprobs(prompt)
    assert first.num_cached_prompt_tokens == 0
    assert h.submitted[after].deltas[0].num_cached_prompt_tokens == 8


def test_prompt_logprobs_of_a_prefill_preempted_midway_start_over():
    # b prefills 3 tokens a step beside a's decodes; at a's third block the pool is empty
    # and b, of lower priority, is preempted with 12 of its 14 prompt tokens computed.
    h = harness(num_blocks=5, block_size=4, max_num_batched_tokens=4)
    a = h.submit(prompt_of(4), sampling_params(max_tokens=12, ignore_eos=True))
    h.schedule()
    h.process_next()
    b = h.submit(prompt_of(14, start=5), sampling_params(max_tokens=1, prompt_logprobs=1),
                 priority=1)
    for _ in range(4):
        assert b not in h.schedule().dropped_request_ids
        h.process_next()
    assert h.scheduler.by_id[b].num_computed == 12
    assert list(h.schedule().dropped_request_ids) == [b]
    h.process_next()
    h.run()
    h.check_outcomes()  # b's one delta carried its prompt logprobs once each
    assert len(h.admission_hits[b]) >= 2 and len(h.submitted[a].tokens(0)) == 12


@pytest.mark.parametrize(("prompt_len", "copies"), [(6, 2), (5, 0)])
def test_forks_share_the_parents_prompt_blocks(prompt_len: int, copies: int):
    h = harness(block_size=4)
    rid = h.submit(prompt_of(prompt_len), sampling_params(n=3, max_tokens=4, ignore_eos=True))
    parent = f"{rid}/0"
    plan = h.schedule()  # the parent computes the prompt but its last token, samples nothing
    assert [n.request_id for n in plan.new_requests] == [parent]
    assert work_tokens(plan) == {parent: prompt_len - 1}
    assert not h.process_next().outputs
    plan = h.schedule()  # the children fork, sharing its full blocks
    parent_table = h.blocks.block_table(parent)
    children = [n for n in plan.new_requests]
    assert [(n.request_id, n.fork_of, n.num_computed_tokens) for n in children] == [
        (f"{rid}/{i}", parent, prompt_len - 1) for i in (1, 2)]
    for child in children:
        assert child.block_ids[0] == parent_table[0]
    assert h.blocks.ref_count(parent_table[0]) == 3
    assert len(plan.block_copies) == copies  # a partial block is copied, never shared
    assert {c.src_block_id for c in plan.block_copies} <= {parent_table[-1]}
    assert work_tokens(plan) == {parent: 1}
    h.process_next()
    h.run()
    h.check_outcomes()
    outputs = {tuple(h.submitted[rid].tokens(i)) for i in range(3)}
    assert len(outputs) == 3  # seeded apart


def test_children_take_their_parents_place_in_the_running_order():
    h = harness(max_num_seqs=2, max_num_batched_tokens=16, block_size=4)
    rid = h.submit(prompt_of(5), sampling_params(n=2, max_tokens=4, ignore_eos=True))
    y = h.submit(prompt_of(20, start=9), sampling_params(max_tokens=4, ignore_eos=True))
    # The parent's prompt but its last token, first come, first served; y the rest.
    assert work_tokens(h.schedule()) == {f"{rid}/0": 4, y: 12}
    h.process_next()
    plan = h.schedule()  # the fork, the parent's last token, the rest of y's prompt
    assert work_tokens(plan) == {f"{rid}/0": 1, y: 8}
    h.process_next()
    # Three decodes, two places: the request admitted first (its children with it) goes on.
    assert work_tokens(h.schedule()) == {f"{rid}/0": 1, f"{rid}/1": 1}
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_fork_that_runs_out_of_blocks_midway_leaves_nothing_in_the_plan():
    # n = 3 with a partial last block: each child needs a copy, and only one block is free.
    h = harness(num_blocks=5, block_size=4, max_num_batched_tokens=16)
    x = h.submit(prompt_of(4), sampling_params(max_tokens=2, ignore_eos=True))
    rid = h.submit(prompt_of(6, start=7), sampling_params(n=3, max_tokens=2, ignore_eos=True))
    parent = f"{rid}/0"
    assert work_tokens(h.schedule()) == {x: 4, parent: 5}  # the parent is ready to fork
    h.process_next()
    assert h.blocks.num_free_blocks == 2
    plan = h.schedule()  # x's next token takes a block first: one is left for two copies
    assert not plan.new_requests and not plan.block_copies and work_tokens(plan) == {x: 1}
    assert h.blocks.num_free_blocks == 1
    h.process_next()  # x ends, its blocks come back
    plan = h.schedule()
    assert [n.fork_of for n in plan.new_requests] == [parent] * 2
    assert len(plan.block_copies) == 2
    h.process_next()
    h.run()
    h.check_outcomes()


@pytest.mark.parametrize(("max_num_seqs", "forks_at_once"), [(5, True), (4, False)])
def test_a_fork_waits_for_room_for_all_n_sequences(max_num_seqs: int, forks_at_once: bool):
    h = harness(max_num_seqs=max_num_seqs, max_num_batched_tokens=32)
    for i in range(2):  # two decoding sequences take two of the step's places
        h.submit(prompt_of(2, start=i), sampling_params(max_tokens=6, ignore_eos=True))
    h.schedule()
    h.process_next()
    rid = h.submit(prompt_of(6, start=5), sampling_params(n=3, max_tokens=3))
    h.schedule()  # the parent prefills
    h.process_next()
    plan = h.schedule()
    assert any(n.fork_of for n in plan.new_requests) == forks_at_once
    assert (f"{rid}/0" in work_tokens(plan)) == forks_at_once
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_fork_waits_for_budget_for_all_n_sequences():
    # The two decodes leave 3 tokens of 5: enough for n = 3 (not for n = 4, as a mutant would
    # demand), and the parent's one token.
    h = harness(max_num_batched_tokens=5)
    for i in range(2):
        h.submit(prompt_of(2, start=i), sampling_params(max_tokens=8, ignore_eos=True))
    h.schedule()
    h.process_next()
    rid = h.submit(prompt_of(4, start=5), sampling_params(n=3, max_tokens=3))
    h.schedule()
    h.process_next()
    plan = h.schedule()
    assert [n.fork_of for n in plan.new_requests] == [f"{rid}/0"] * 2
    h.process_next()
    h.run()
    h.check_outcomes()



def test_children_are_placed_right_after_their_parent():
    """The running order (admission order, children with their parent) is the order a step
    serves sequences in when its budget runs short."""
    h = harness(max_num_batched_tokens=32)
    sampling = sampling_params(max_tokens=8, ignore_eos=True)
    x = h.submit(prompt_of(2), sampling)
    r = h.submit(prompt_of(5, start=3), sampling_params(n=2, max_tokens=4, ignore_eos=True))
    y = h.submit(prompt_of(2, start=9), sampling)
    assert work_tokens(h.schedule()) == {x: 2, f"{r}/0": 4, y: 2}
    h.process_next()
    assert [n.fork_of for n in h.schedule().new_requests] == [f"{r}/0"]
    h.process_next()
    plan = h.schedule()
    assert [w.request_id for w in plan.work] == [x, f"{r}/0", f"{r}/1", y]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_fork_step_admits_what_fits():
    """A fork is no preemption: the waiting request that fits starts in the same step."""
    h = harness(block_size=4)
    r = h.submit(prompt_of(6), sampling_params(n=2, max_tokens=2, ignore_eos=True))
    h.schedule()
    h.process_next()
    w = h.submit(prompt_of(3, start=8), sampling_params(max_tokens=2))
    plan = h.schedule()
    assert [(n.request_id, n.fork_of) for n in plan.new_requests] == [
        (f"{r}/1", f"{r}/0"), (w, "")]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_a_parent_that_cannot_fork_yet_lets_the_others_run():
    h = harness(max_num_seqs=4, max_num_batched_tokens=32)
    sampling = sampling_params(max_tokens=6, ignore_eos=True)
    x, y = h.submit(prompt_of(2), sampling), h.submit(prompt_of(2, start=1), sampling)
    h.schedule()
    h.process_next()
    r = h.submit(prompt_of(6, start=5), sampling_params(n=3, max_tokens=3))
    z = h.submit(prompt_of(40, start=9), sampling_params(max_tokens=1))
    assert work_tokens(h.schedule()) == {x: 1, y: 1, f"{r}/0": 5, z: 25}
    h.process_next()
    plan = h.schedule()  # two places left, three needed: r waits; z's prefill goes on
    assert not plan.new_requests and work_tokens(plan) == {x: 1, y: 1, z: 15}
    h.process_next()
    h.run()
    h.check_outcomes()



def test_a_fork_that_runs_out_of_blocks_keeps_the_copies_of_an_earlier_fork():
    """Two parents fork in one step with two blocks free: r's child takes one for its copy;
    q's two children find one, so q waits, and only q's copies leave the plan."""
    h = harness(num_blocks=6, block_size=4)
    r = h.submit(prompt_of(6), sampling_params(n=2, max_tokens=2, ignore_eos=True))
    q = h.submit(prompt_of(6, start=7), sampling_params(n=3, max_tokens=2, ignore_eos=True))
    assert work_tokens(h.schedule()) == {f"{r}/0": 5, f"{q}/0": 5}
    h.process_next()
    plan = h.schedule()
    assert [(n.request_id, n.fork_of) for n in plan.new_requests] == [(f"{r}/1", f"{r}/0")]
    assert [c.dst_block_id for c in plan.block_copies] == h.blocks.block_table(f"{r}/1")[-1:]
    h.process_next()
    h.run()
    h.check_outcomes()


def test_aborting_a_request_before_it_forks_forgets_it():
    h = harness(max_num_batched_tokens=4)
    r = h.submit(prompt_of(10), sampling_params(n=3, max_tokens=2))
    h.schedule()
    h.process_next()
    h.abort(r)  # asserts the request is gone, though its children never existed
    h.run()
    h.check_outcomes()



# -- bugs this file found ------------------------------------------------------------------------


def test_a_child_forked_in_a_step_is_not_dropped_by_it():
    h = harness(num_blocks=8, block_size=4, max_num_batched_tokens=16)
    sampling = sampling_params(max_tokens=3, ignore_eos=True)
    rid = h.submit(prompt_of(21), sampling_params(n=2, max_tokens=3, ignore_eos=True))
    h.schedule()  # the parent prefills 16 of the 20 tokens it computes before forking
    h.process_next()
    h.submit(prompt_of(16, start=3), sampling, priority=-1)  # starts after the parent
    h.schedule()  # the parent's last 4 tokens; the urgent request takes the pool's last blocks
    h.process_next()
    # The parent forks, then needs a block: the child, latest in queue order, goes first.
    plan = h.schedule()
    assert f"{rid}/1" not in plan.dropped_request_ids
    h.process_next()
    h.run()
    h.check_outcomes()


def test_parents_waiting_to_fork_do_not_deadlock_the_pool():
    h = harness(num_blocks=6, block_size=4, max_num_batched_tokens=18)
    h.submit(prompt_of(10), sampling_params(n=2, max_tokens=2))
    h.submit(prompt_of(10, start=7), sampling_params(n=2, max_tokens=2))
    h.schedule()  # both parents prefill 9 tokens, 3 blocks each: the whole pool
    h.process_next()
    assert h.blocks.num_free_blocks == 0
    # Each fork needs a block for the copy of its partial last block.
    h.run()
    h.check_outcomes()


def test_prompt_logprobs_of_a_fork_lost_before_its_first_token_are_sent_once():
    """The executor is lost after the fork, before any token: the request starts over as new
    (sequence 0 prefills, then forks), so the prompt logprobs are gathered once. Before the
    fix both sequences recomputed the prompt side by side and the first delta carried the
    prompt logprobs twice, interleaved."""
    h = harness(block_size=4, max_num_batched_tokens=8)
    rid = h.submit(prompt_of(6), sampling_params(n=2, max_tokens=2, prompt_logprobs=0))
    h.schedule()  # the parent prefills 5 tokens
    h.process_next()
    plan = h.schedule()  # the fork; its result (the first token) never comes back
    assert any(new.fork_of for new in plan.new_requests)
    other = h.submit(prompt_of(3, start=9), sampling_params(max_tokens=2))  # after the fork
    h.lose_executor()
    assert [s.seq_id for s in h.scheduler.waiting] == [f"{rid}/0", other]
    plan = h.schedule()
    assert [(n.request_id, n.fork_of) for n in plan.new_requests] == [
        (f"{rid}/0", ""), (other, "")]
    assert work_tokens(plan) == {f"{rid}/0": 5, other: 3}  # first come, first served
    h.process_next()
    h.run()
    h.check_outcomes()

# -- random workloads ----------------------------------------------------------------------------

TOKENS = st.integers(0, VOCAB - 1)
MAX_N = 3


@st.composite
def sampling_strategy(draw) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        n=draw(st.sampled_from([1, 1, 1, 2, MAX_N])),
        min_tokens=draw(st.sampled_from([0, 0, 0, 1, 3])),
        ignore_eos=draw(st.sampled_from([False, False, True])),
        stop_token_ids=draw(st.sampled_from([[], [], [2], [2, 3]])),
        disable_spec_decode=draw(st.sampled_from([False, False, True])))
    max_tokens = draw(st.none() | st.integers(1, 10))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    logprobs = draw(st.sampled_from([None, None, 0]))
    if logprobs is not None:
        params.logprobs = logprobs
    if draw(st.integers(0, 4)) == 0:
        params.prompt_logprobs = 0
    return params


class StepSchedulerMachine(RuleBasedStateMachine):
    """Requests arrive (often several at once), the loop turns, clients abort, the gateway
    stops sequences, the executor is lost, on pools small enough to preempt, with or without
    overlapped steps; the Harness checks every plan and result, and at the end every stream
    against the reference."""

    def __init__(self):
        super().__init__()
        self.h: Harness | None = None
        self.prompts: list[list[int]] = []  # to share prefixes with

    @initialize(data=st.data(), block_size=st.sampled_from([1, 2, 4]),
                max_model_len=st.integers(6, 28), max_num_seqs=st.integers(MAX_N, 8),
                budget=st.integers(3, 40), caching=st.sampled_from([True, True, True, False]),
                overlap=st.booleans(), speculative=st.sampled_from([0, 0, 1, 3]),
                disable_by_batch_size=st.sampled_from([0, 0, 2]),
                window=st.sampled_from([None, None, 1, 2, 5]))
    def setup(self, data, block_size, max_model_len, max_num_seqs, budget, caching, overlap,
              speculative, disable_by_batch_size, window):
        # Room for one sequence at full length plus a fork's block copies, so that every
        # request can finish, and not much more: concurrent requests must preempt each other.
        per_seq = -(-max_model_len // block_size)
        num_blocks = data.draw(st.integers(per_seq + MAX_N, 2 * per_seq + MAX_N))
        self.h = Harness(Config(num_blocks, block_size, max_num_seqs, budget, max_model_len,
                                caching, overlap, speculative, disable_by_batch_size, window))
        self.prompts = [data.draw(st.lists(TOKENS, min_size=max_model_len - 1,
                                           max_size=max_model_len - 1))]

    @precondition(lambda self: len(self.h.submitted) < 12)
    @rule(data=st.data(), count=st.integers(1, 3), turns=st.integers(0, 4))
    def submit(self, data, count, turns):
        """Requests whose prompts share a prefix with earlier ones (often a cache hit)."""
        for _ in range(count):
            base = data.draw(st.sampled_from(self.prompts))
            cut = data.draw(st.integers(0, len(base)))
            suffix = data.draw(st.lists(TOKENS, min_size=0 if cut else 1, max_size=8))
            prompt = (base[:cut] + suffix)[:self.h.config.max_model_len - 1]
            self.prompts.append(prompt)
            priority = data.draw(st.sampled_from([0, 0, 0, 1, -1, 2]))
            salt = data.draw(st.sampled_from([b"", b"", b"", b"other"]))
            self.h.submit(prompt, data.draw(sampling_strategy()), priority, salt)
        self._turn(turns)

    @rule(turns=st.integers(1, 10))
    def advance(self, turns):
        self._turn(turns)

    def _turn(self, turns: int) -> None:
        for _ in range(turns):
            if not self.h.advance():
                break

    def _stoppable(self) -> list[tuple[str, int]]:
        """Sequences whose text the gateway has seen (a token) and that have not finished."""
        return [(rid, index) for rid, sub in sorted(self.h.submitted.items())
                if not sub.aborted for index in range(sub.request.n)
                if sub.tokens(index) and sub.finish(index) is None]

    @precondition(lambda self: self.h.submitted)
    @rule(data=st.data(), event=st.sampled_from(["abort", "stop", "stop", "lose", "none",
                                                 "none"]))
    def disrupt(self, data, event):
        """Now and then: a client aborts, a stop string matches, the executor is lost."""
        h = self.h
        if event == "abort":
            h.abort(data.draw(st.sampled_from(sorted(h.submitted))))
        elif event == "stop" and self._stoppable():
            h.stop(*data.draw(st.sampled_from(self._stoppable())))
        elif event == "lose" and h.scheduler.has_work:
            h.lose_executor()

    @invariant()
    def blocks_are_accounted_for(self):
        if self.h is not None:
            self.h.check_blocks()

    def teardown(self):
        if self.h is None:
            return
        self.h.run()
        self.h.check_outcomes()


TestStepSchedulerStateful = StepSchedulerMachine.TestCase
# No shrinking: a failing example of this machine takes hypothesis minutes to shrink, and a
# mutation run (tests/mutation) meets one per mutant. The examples are derandomized, so a
# failure reproduces as printed; add Phase.shrink to the phases for a minimal one.
TestStepSchedulerStateful.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, derandomize=True,
    phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])


# -- speculative decoding ------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
def test_speculation_keeps_every_stream_and_gives_every_block_back(overlap):
    """Proposals accepted and rejected, on a pool small enough to preempt, with a request
    aborted and the executor lost midway: every stream is the reference's, nothing leaks."""
    h = harness(num_blocks=40, block_size=2, max_model_len=24, overlap=overlap, speculative=3)
    ids = [h.submit(prompt_of(5 + i), sampling_params(max_tokens=15 + i)) for i in range(4)]
    ids.append(h.submit(prompt_of(6, start=3), sampling_params(n=2, prompt_logprobs=1)))
    ids.append(h.submit(prompt_of(4), sampling_params(logprobs=1, stop_token_ids=[5])))
    for _ in range(3):
        h.advance()
    h.abort(ids[1])
    h.advance()
    before = h.scheduler.counters  # the lost pool's
    h.lose_executor()
    h.run()
    h.check_outcomes()
    accepted, drafts = (before.accepted_tokens + h.scheduler.counters.accepted_tokens,
                        before.draft_tokens + h.scheduler.counters.draft_tokens)
    assert 0 < accepted < drafts
    assert before.speculative_decodes > 0 and h.scheduler.counters.speculative_decodes > 0


def test_no_proposals_above_the_batch_size_threshold():
    h = harness(speculative=2, disable_by_batch_size=2)
    h.submit(prompt_of(4), sampling_params(max_tokens=6))
    h.run()
    alone = [w.num_lookahead_tokens for p in h.plans for w in p.work]
    assert alone[0] == 0 and max(alone) == 2  # the prefill, then decodes that speculate
    h = harness(speculative=2, disable_by_batch_size=2)
    for i in range(3):
        h.submit(prompt_of(4 + i), sampling_params(max_tokens=6))
    h.schedule()
    h.process_next()
    plan = h.schedule()
    assert len(h.scheduler.running) == 3
    assert [w.num_lookahead_tokens for w in plan.work] == [0, 0, 0]
    h.run()
    h.check_outcomes()


def test_a_request_that_turns_speculation_off_verifies_no_proposals():
    """disable_spec_decode: that request's decodes get no lookahead; the others' still do."""
    h = harness(speculative=2)
    off = h.submit(prompt_of(4), sampling_params(max_tokens=8, disable_spec_decode=True))
    on = h.submit(prompt_of(5), sampling_params(max_tokens=8))
    h.run()
    lookahead = {rid: [w.num_lookahead_tokens for p in h.plans for w in p.work
                       if w.request_id.startswith(rid)] for rid in (off, on)}
    assert not any(lookahead[off]) and max(lookahead[on]) == 2
    h.check_outcomes()


@pytest.mark.parametrize("speculative", [0, 2])
def test_more_tokens_than_a_step_can_verify_fail_the_request(speculative):
    """An executor returning more tokens for a sequence than 1 + its proposals allow is
    wrong: that request fails, naming it, and the others go on."""
    h = harness(speculative=speculative)
    bad, good = h.submit(prompt_of(4)), h.submit(prompt_of(5))
    h.schedule()
    result = h.in_flight.popleft()
    output = next(o for o in result.outputs if o.request_id == bad)
    output.token_ids.extend([3] * (speculative + 1))
    refused = h.scheduler.process(result)
    assert list(refused) == [bad]
    assert f"returned {speculative + 2} tokens in one step" in refused[bad]
    assert bad not in h.scheduler.requests and good in h.scheduler.requests
    h.submitted[bad].aborted = True
    h.run()
    assert h.submitted[good].finish(0) is not None
    assert h.blocks.num_used_blocks == 0


def test_tokens_for_a_sequence_with_no_sample_in_flight_fail_the_request():
    """An executor answering twice for one sample (or for a step that sampled nothing) is
    wrong: that request fails, naming the sequence, instead of taking a token nobody asked
    for."""
    h = harness()
    bad, good = h.submit(prompt_of(4)), h.submit(prompt_of(5))
    h.schedule()
    result = h.in_flight.popleft()
    assert h.scheduler.process(result) == {}
    again = executor_pb2.StepResult(step_id=result.step_id, outputs=[
        o for o in result.outputs if o.request_id == bad])
    refused = h.scheduler.process(again)
    assert list(refused) == [bad] and "which had no sample in flight" in refused[bad]
    assert good in h.scheduler.requests
    h.submitted[bad].aborted = True
    h.run()
    assert h.submitted[good].finish(0) is not None
    assert h.blocks.num_used_blocks == 0


def test_a_step_without_proposals_still_has_room_for_those_in_flight():
    """Overlapped steps with speculation: step 2 verifies a proposal for a sequence and is
    still running when step 3 is planned for it without proposals (its max_tokens leaves room
    for none). If step 2 accepts its proposal, step 3 starts a position later, so its blocks
    must hold that position too (they once held only step 3's own tokens: found by the state
    machine, once windows joined its draws)."""
    h = harness(block_size=1, overlap=True, speculative=1)
    rid = h.submit(prompt_of(4), sampling_params(max_tokens=3, ignore_eos=True))
    first = h.schedule()  # the prompt, sampling the first token
    h.process_next()
    second = h.schedule()
    assert [w.num_lookahead_tokens for w in second.work] == [1]
    third = h.schedule()  # planned while the second runs: no room left for proposals
    assert [w.num_lookahead_tokens for w in third.work] == [0]
    seq = h.scheduler.by_id[rid]
    # 4 prompt positions, the second step's token and proposal, the third step's token.
    assert h.blocks.num_held_blocks(rid) == 4 + 2 + 1 == seq.num_computed + 1
    assert first.work and second.work
    h.run()
    h.check_outcomes()


def test_a_sliding_window_keeps_a_long_generation_to_a_window_of_blocks():
    """Window 8, blocks of 4: a query sees at most three blocks, so a sequence generating 50
    tokens after a 12-token prompt never holds more than 8 / 4 + 2 blocks (the block it
    writes into, and the next step's), and three of them run on a pool of 16 blocks
    that without the window holds one such sequence at a time; the streams are the
    reference's (the simulated executor checks every read inside the window)."""
    peaks = {}
    for window in (None, 8):
        h = harness(num_blocks=16, block_size=4, max_model_len=64, sliding_window=window)
        rids = [h.submit(prompt_of(12, start=3 * i), sampling_params(max_tokens=50,
                                                                    ignore_eos=True))
                for i in range(3)]
        peak = 0
        while h.advance():
            peak = max([peak] + [h.blocks.num_held_blocks(s.seq_id)
                                 for s in h.scheduler.running])
        h.check_outcomes()
        assert all(h.submitted[r].finish(0) is not None for r in rids)
        peaks[window] = (peak, h.scheduler.counters.preemptions)
    assert peaks[8][0] <= 8 // 4 + 2 and peaks[8][1] == 0
    assert peaks[None][0] >= (12 + 50 - 1) // 4 and peaks[None][1] > 0  # the whole sequence
