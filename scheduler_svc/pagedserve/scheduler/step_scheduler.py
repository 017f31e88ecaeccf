"""The step loop's decisions for one executor pool (docs/design.md §4): which tokens of which
sequences run in each step, as StepPlan deltas, and what the results mean for each request.

Each step has a token budget and a sequence limit. Running sequences go first (a decode is one
token; a partial prefill continues in chunks), then waiting ones fill the rest of the budget
(chunked prefill), in priority / arrival order: first come, first served, the first prompt
taking all the budget it can, so the earliest prompts finish first. While a short prompt (one
that a quarter of the budget finishes) prefills or waits, a longer prompt's chunk takes at most
a quarter of the budget, so a long prompt cannot hold back the short requests queued behind it
(like vLLM's long_prefill_token_threshold). Capping every chunk whenever two prompts contend
would make long prompts advance side by side and all finish late (docs/performance.md, issue
24's long-prompt workload). When blocks run
out, the lowest-priority, latest-arrived running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed from prompt + generated
tokens later. No new sequence is admitted in a step that had to preempt. Where the model
attends through a sliding window, each sequence's blocks that fall outside it are released
before it is planned (block_manager.py), so long generations hold a window's worth of blocks.

Steps may overlap (plan N+1 sent before result N): a sequence's sampled-but-unseen tokens are
counted in `num_in_flight`; when a result shows a sequence finished, whatever it sampled in a
later step is discarded, never streamed.

Speculative decoding (docs/speculative_decoding.md): where the executor speculates, a decode
may verify up to `num_speculative_tokens` proposals the executor makes itself; the plan gives
it that lookahead and the blocks for it, also for what a step in flight may accept before this
one runs. A result of m tokens accepted m - 1 proposals, whose K/V that step computed.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass

from pagedserve.scheduler.block_manager import BlockManager, NoFreeBlocks
from pagedserve.scheduler.sequence import Request, SeqState, Sequence
from pagedserve.v1 import common_pb2, executor_pb2, scheduler_pb2


@dataclass(frozen=True)
class StepLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    # The executor's speculative decoding: proposals per decode (0: none), and the running
    # sequences above which a step verifies none (0: no limit).
    num_speculative_tokens: int = 0
    speculative_disable_by_batch_size: int = 0

    @property
    def contended_prefill_chunk(self) -> int:
        """Most tokens one prefill chunk may take while a short prompt waits; a prompt with no
        more than this left to compute is a short one."""
        return max(1, self.max_num_batched_tokens // 4)


@dataclass
class StepCounters:
    steps: int = 0
    preemptions: int = 0
    scheduled_tokens: int = 0
    # Speculative decoding: decodes planned with a lookahead, proposals the executor verified,
    # and those it accepted.
    speculative_decodes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class StepScheduler:
    def __init__(self, blocks: BlockManager, limits: StepLimits, eos_token_ids: SequenceType[int]):
        self.blocks = blocks
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        # Blocks each waiting sequence needs to start, as counted when it was queued, and their
        # sum: kept as the queue changes, since routing reads it for every new request.
        self._claims: dict[str, int] = {}
        self._claimed_blocks = 0
        self.running: list[Sequence] = []  # in admission order
        self.by_id: dict[str, Sequence] = {}
        self.requests: dict[str, Request] = {}
        self.counters = StepCounters()
        self._to_drop: list[str] = []
        self._step_id = 0

    # -- requests in and out ------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request (its sequence 0, or all n when its prompt is one token)."""
        self.requests[request.request_id] = request
        first = 1 if request.forks_first else request.n
        for index in range(first):
            self._enqueue(self._new_sequence(request, index))

    def requeue(self, seqs: SequenceType[Sequence]) -> None:
        """Take over sequences from a lost executor: recompute them from scratch here. A
        forked request that has streamed nothing starts over as new: its children hold the
        prompt alone, so sequence 0 forks them again (recomputed side by side, each would
        gather the prompt logprobs, and a child could sample before sequence 0 had them)."""
        for seq in seqs:
            request = seq.request
            self.requests[request.request_id] = request
            if request.forks_first and not request.first_delta_sent:
                if seq.index:
                    continue  # forked again by sequence 0
                seq.forked, request.seqs[:] = False, [seq]
            seq.move_to_new_executor()
            self.by_id[seq.seq_id] = seq
            self._enqueue(seq)

    def abort(self, request_id: str) -> None:
        """Cancel: every sequence ends now and its blocks are freed (before the next plan)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if seq.state is not SeqState.FINISHED:
                self._finish(seq)
        self.requests.pop(request_id, None)  # its unforked children will never exist

    def stop(self, request_id: str, seq_index: int) -> None:
        """Sequence `seq_index` of the request ends now with STOP (a stop string the gateway
        matched): its blocks are freed before the next plan, its final delta is emitted, and
        the other sequences go on. Nothing happens for one that has finished."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if seq.index == seq_index and seq.state is not SeqState.FINISHED:
                self._finish(seq, final_reason=common_pb2.FINISH_REASON_STOP)
                return

    def take_all(self) -> list[Sequence]:
        """Every unfinished sequence, leaving this pool empty (its executor was lost)."""
        seqs = [s for s in self.by_id.values() if s.state is not SeqState.FINISHED]
        self.waiting.clear()
        self._claims.clear()
        self._claimed_blocks = 0
        self.running.clear()
        self.by_id.clear()
        self.requests.clear()
        self._to_drop.clear()
        return seqs

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_drop)

    @property
    def num_unclaimed_free_blocks(self) -> int:
        """Free blocks less those the waiting sequences need to start (their known tokens): the
        room a newly routed request finds. Requests that arrive together are queued before
        any step allocates for them; counting only free blocks sent them all to one executor."""
        return self.blocks.num_free_blocks - self._claimed_blocks

    @property
    def num_in_flight(self) -> int:
        return sum(s.num_in_flight for s in self.running)

    # -- planning ---------------------------------------------------------------------

    def schedule(self) -> executor_pb2.StepPlan | None:
        """The next step's plan, or None when there is nothing to send."""
        plan = executor_pb2.StepPlan(dropped_request_ids=self._to_drop)
        self._to_drop = []
        budget = _Budget(self.limits.max_num_batched_tokens, self.limits.max_num_seqs)
        preemptions = self.counters.preemptions
        self._schedule_running(plan, budget)
        if self.counters.preemptions == preemptions:  # a step that preempts admits nothing
            self._schedule_waiting(plan, budget)
        if not (plan.work or plan.new_requests or plan.dropped_request_ids
                or plan.block_copies):
            return None
        for work in plan.work:
            seq = self.by_id[work.request_id]
            self.blocks.commit(seq.seq_id, seq.token_ids, min(seq.num_computed,
                                                               len(seq.token_ids)))
        self._step_id += 1
        plan.step_id = self._step_id
        self.counters.steps += 1
        self.counters.scheduled_tokens += budget.used_tokens
        return plan

    def _schedule_running(self, plan: executor_pb2.StepPlan, budget: _Budget) -> None:
        """Continue running sequences, decodes first, then partial prefills, preempting the
        lowest-priority ones when blocks run out. Every running sequence has a token to compute
        (after its last known one it has a sample in flight), but a parent waiting to fork."""
        scheduled: set[int] = set()
        decodes, prefills = [], []
        for seq in self.running:
            (decodes if seq.compute_target() - seq.num_computed == 1 else prefills).append(seq)
        lookahead = self._step_lookahead()
        for seq in decodes + prefills:
            if not (budget.seqs_left and budget.tokens_left):
                break
            if seq.state is not SeqState.RUNNING:
                continue  # preempted earlier in this pass
            self.blocks.release_outside_window(seq.seq_id, seq.num_computed)
            if self._ready_to_fork(seq):
                forked = self._fork_making_room(seq, plan, budget, scheduled)
                if not forked:
                    continue
                # A fork's parent and children cannot leave the plan that forks them: the
                # executor applies drops before forks.
                scheduled.update(id(s) for s in (seq, *forked))
            num_tokens = self._chunk(seq.compute_target() - seq.num_computed, budget)
            proposals = self._lookahead(seq, num_tokens, lookahead, budget)
            new_blocks = None
            while new_blocks is None:
                try:
                    new_blocks = self.blocks.allocate(
                        seq.seq_id, self._slots_needed(seq, num_tokens, proposals))
                except NoFreeBlocks:
                    if proposals:  # speculation never preempts: the decode goes without
                        proposals = 0
                        continue
                    victim = self._pick_victim(exclude=scheduled)
                    if victim is None:  # only this step's fork is left: it computes later
                        break
                    self._preempt(victim, plan)
                    if victim is seq:
                        break
            if new_blocks is not None:
                self._add_work(plan, seq, num_tokens, new_blocks, budget, proposals)
                scheduled.add(id(seq))

    def _step_lookahead(self) -> int:
        """Proposals a decode may verify this step: none above the batch-size threshold."""
        limit = self.limits.speculative_disable_by_batch_size
        if limit and len(self.running) > limit:
            return 0
        return self.limits.num_speculative_tokens

    def _lookahead(self, seq: Sequence, num_tokens: int, lookahead: int,
                   budget: _Budget) -> int:
        """A sequence's lookahead: only on a decode of its last known token, unless its request
        turned speculation off, and no more than its max_tokens, the model length (as far as
        known here) and the step's token budget leave room for."""
        if (not lookahead or num_tokens != 1 or seq.num_computed + 1 != seq.num_known_tokens
                or seq.request.sampling.disable_spec_decode):
            return 0
        left = min(seq.request.max_output_tokens - seq.num_output_tokens,
                   self.limits.max_model_len - len(seq.token_ids)) - seq.num_in_flight - 1
        return max(0, min(lookahead, left, budget.tokens_left - 1))

    def _slots_needed(self, seq: Sequence, num_tokens: int, proposals: int) -> int:
        """Positions the sequence's blocks must hold for this step: its tokens, its proposals
        and those the steps in flight may have accepted before this one runs (whether or not
        this step has proposals of its own); never past the model length (the executor
        proposes no more than the blocks hold)."""
        slots = seq.num_computed + num_tokens + proposals + sum(seq.lookahead_in_flight)
        return min(slots, max(self.limits.max_model_len, seq.num_computed + num_tokens))

    def _schedule_waiting(self, plan: executor_pb2.StepPlan, budget: _Budget) -> None:
        while self.waiting and budget.seqs_left and budget.tokens_left:
            seq = self.waiting[0]
            if seq.num_in_flight:  # preempted while a sample was in flight: wait for it
                break
            # Prompt logprobs not yet sent need the whole prompt computed: a cached prefix has
            # no logits to give (vLLM skips the cache for them too), nor hidden states for a
            # mean. Its blocks still fill it.
            request = seq.request
            recompute_prompt = ((request.sampling.HasField("prompt_logprobs")
                                 or request.sampling.pooling.type == common_pb2.Pooling.TYPE_MEAN)
                                and not request.first_delta_sent)
            if recompute_prompt and not request.prompt_logprobs_complete:
                request.prompt_logprobs.clear()  # a preempted chunked prefill starts over
            computed = self.blocks.admit(seq.seq_id, seq.token_ids,
                                         use_cache=not recompute_prompt,
                                         salt=request.cache_salt)
            self.blocks.release_outside_window(seq.seq_id, computed)  # a long cached prefix
            # 0 only for a parent whose hit covers all it computes before forking.
            num_tokens = self._chunk(seq.compute_target() - computed, budget)
            try:
                self.blocks.allocate(seq.seq_id, computed + num_tokens)
            except NoFreeBlocks:
                self.blocks.free(seq.seq_id)
                break
            self._unclaim(self.waiting.pop(0))
            if seq.index == 0 and not seq.request.first_delta_sent:
                seq.request.num_cached_prompt_tokens = computed
            seq.start_running(computed)
            self.running.append(seq)
            plan.new_requests.add(
                request_id=seq.seq_id, token_ids=seq.token_ids,
                num_prompt_tokens=request.num_prompt_tokens, sampling=request.sampling,
                seq_index=seq.index, block_ids=self.blocks.block_table(seq.seq_id),
                num_computed_tokens=computed)
            if num_tokens:
                self._add_work(plan, seq, num_tokens, [], budget)

    def _chunk(self, left: int, budget: _Budget) -> int:
        """Tokens a sequence with `left` tokens still to compute computes in this step: all
        the budget leaves, but a quarter of the budget where it is longer than that and a
        short prompt contends (`_short_prompt_contends`)."""
        cap = self.limits.contended_prefill_chunk
        if left > cap and self._short_prompt_contends(budget.seqs_left):
            return min(budget.tokens_left, cap)
        return min(left, budget.tokens_left)

    def _short_prompt_contends(self, seqs_left: int) -> bool:
        """Whether a sequence has a prompt of at most a quarter of the budget left to compute:
        running (one token left is a decode, not a prompt) or waiting among the `seqs_left`
        that this step could still admit (their cached prefixes not counted: they may count
        as longer than they are, never as shorter). The sequence asking is longer than that,
        so it is never the short one itself."""
        cap = self.limits.contended_prefill_chunk
        running = (s for s in self.running if 1 < s.compute_target() - s.num_computed <= cap)
        waiting = (s for s in itertools.islice(self.waiting, seqs_left + 1)
                   if s.compute_target() - s.num_computed <= cap)
        return next(itertools.chain(running, waiting), None) is not None

    def _ready_to_fork(self, seq: Sequence) -> bool:
        request = seq.request
        return (seq.index == 0 and request.forks_first and not seq.forked
                and seq.num_computed == request.num_prompt_tokens - 1
                and seq.num_in_flight == 0)

    def _fork_making_room(self, parent: Sequence, plan: executor_pb2.StepPlan, budget: _Budget,
                          scheduled: set[int]) -> list[Sequence]:
        """`_fork`, preempting victims as allocation does while the copies of the parent's
        partial block find no free block (parents waiting to fork could otherwise hold the
        whole pool, and nothing would ever run again); a parent that would be its own victim
        waits instead. Returns the children ([] when this step lacks the budget or the
        blocks)."""
        while True:
            try:
                return self._fork(parent, plan, budget)
            except NoFreeBlocks:
                victim = self._pick_victim(exclude=scheduled)  # the parent at the latest
                if victim is parent:  # it waits for blocks others free (admission made sure
                    return []  # the pool holds its n sequences together)
                self._preempt(victim, plan)

    def _fork(self, parent: Sequence, plan: executor_pb2.StepPlan,
              budget: _Budget) -> list[Sequence]:
        """Fork the n - 1 children of `parent`, sharing its computed prompt; [] when this step
        lacks the budget (they fork in a later step). NoFreeBlocks, with nothing changed, when
        a copy of the partial block finds no free block."""
        request = parent.request
        if budget.seqs_left < request.n or budget.tokens_left < request.n:
            return []
        computed = parent.num_computed
        copies_before = len(plan.block_copies)
        forked: list[Sequence] = []
        try:
            for index in range(1, request.n):
                child = Sequence(request=request, index=index,
                                 token_ids=list(request.prompt_token_ids))
                copy = self.blocks.fork(parent.seq_id, child.seq_id, computed)
                forked.append(child)
                if copy is not None:
                    plan.block_copies.add(src_block_id=copy.src, dst_block_id=copy.dst)
        except NoFreeBlocks:
            for child in forked:
                self.blocks.free(child.seq_id)
            del plan.block_copies[copies_before:]
            raise
        parent.forked = True
        position = self.running.index(parent) + 1
        for child in forked:
            request.seqs.append(child)
            self.by_id[child.seq_id] = child
            child.start_running(computed)
            plan.new_requests.add(request_id=child.seq_id, fork_of=parent.seq_id,
                                  seq_index=child.index,
                                  block_ids=self.blocks.block_table(child.seq_id),
                                  num_computed_tokens=computed)
        self.running[position:position] = forked
        return forked

    def _add_work(self, plan, seq: Sequence, num_tokens: int, new_blocks: list[int],
                  budget: _Budget, lookahead: int = 0) -> None:
        plan.work.add(request_id=seq.seq_id, num_tokens=num_tokens, new_block_ids=new_blocks,
                      num_lookahead_tokens=lookahead)
        seq.num_computed += num_tokens
        if seq.num_computed == seq.num_known_tokens:
            # This step computes its last known token: it samples.
            seq.lookahead_in_flight.append(lookahead)
        budget.take(num_tokens + lookahead)  # proposals are computed too
        self.counters.speculative_decodes += lookahead > 0

    def _pick_victim(self, exclude: set[int]) -> Sequence | None:
        """The lowest-priority, latest-arrived running sequence not yet planned this step
        (planned ones cannot leave: the plan computes or forks them). None only when the
        sequence asking for blocks is a parent that forked in this step."""
        return max((s for s in self.running if id(s) not in exclude), key=lambda s: s.sort_key,
                   default=None)

    def _preempt(self, seq: Sequence, plan: executor_pb2.StepPlan) -> None:
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        if seq.on_executor:  # dropped by this very plan, before its work runs
            plan.dropped_request_ids.append(seq.seq_id)
        seq.preempt()
        self._enqueue(seq)
        self.counters.preemptions += 1

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        seq = Sequence(request=request, index=index, token_ids=list(request.prompt_token_ids))
        request.seqs.append(seq)
        self.by_id[seq.seq_id] = seq
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        claim = self._claims[seq.seq_id] = -(-len(seq.token_ids) // self.blocks.block_size)
        self._claimed_blocks += claim

    def _unclaim(self, seq: Sequence) -> None:
        self._claimed_blocks -= self._claims.pop(seq.seq_id)

    # -- results ----------------------------------------------------------------------

    def process(self, result: executor_pb2.StepResult) -> dict[str, str]:
        """Apply one step's outputs: accept tokens, stream them, finish what stopped. Returns
        the requests the executor refused (request id -> reason): they are aborted here (their
        refused sequence has no mirror left to drop); failing their clients is the caller's.
        A refusal of a sequence already gone (aborted, or refused in an overlapped step) is
        no news and left out."""
        refused = {}
        self.counters.draft_tokens += result.num_draft_tokens
        for failure in result.failed_requests:
            seq = self.by_id.get(failure.request_id)
            if seq is None:
                continue
            seq.on_executor = False
            refused[seq.request.request_id] = failure.message
            self.abort(seq.request.request_id)
        for output in result.outputs:
            seq = self.by_id.get(output.request_id)
            if seq is None or seq.state is SeqState.FINISHED:
                continue  # finished or aborted while this step ran: discard
            request = seq.request
            if output.prompt_logprobs and not request.prompt_logprobs_complete:
                request.prompt_logprobs.extend(output.prompt_logprobs)
            if output.embedding:
                request.embedding = list(output.embedding)
            if not output.token_ids:
                continue
            accepted = len(output.token_ids) - 1  # proposals, computed by that step
            wrong = None  # the executor's: the request cannot go on
            if not seq.num_in_flight:
                wrong = f"the executor returned tokens for {seq.seq_id}, which had no sample " \
                        "in flight"
            elif accepted > self.limits.num_speculative_tokens:
                wrong = (f"the executor returned {len(output.token_ids)} tokens in one step "
                         f"for {seq.seq_id}, where at most "
                         f"{1 + self.limits.num_speculative_tokens} can be")
            if wrong:
                refused[request.request_id] = wrong
                self.abort(request.request_id)
                continue
            seq.lookahead_in_flight.popleft()
            self.counters.accepted_tokens += accepted
            if seq.state is SeqState.RUNNING:  # a preempted one recomputes from scratch
                seq.num_computed += accepted
            self._accept(seq, output)
        return refused

    def _accept(self, seq: Sequence, output: executor_pb2.RequestOutput) -> None:
        request, params = seq.request, seq.request.sampling
        delta = scheduler_pb2.TokenDelta(seq_index=seq.index)
        for i, token in enumerate(output.token_ids):
            min_tokens_done = seq.num_output_tokens >= params.min_tokens
            if min_tokens_done and ((token in self.eos_token_ids and not params.ignore_eos)
                                    or token in params.stop_token_ids):
                delta.finish_reason = common_pb2.FINISH_REASON_STOP
                delta.stop_token_id = token
                break
            seq.token_ids.append(token)
            delta.token_ids.append(token)
            if i < len(output.logprobs):
                delta.logprobs.append(output.logprobs[i])
            if (seq.num_output_tokens >= request.max_output_tokens
                    or len(seq.token_ids) >= self.limits.max_model_len):
                delta.finish_reason = common_pb2.FINISH_REASON_LENGTH
                break
        if delta.finish_reason:
            self._finish(seq)  # the delta below is its final one
        self._emit(request, delta)

    def _finish(self, seq: Sequence, final_reason: int | None = None) -> None:
        """The sequence ends: its blocks are freed and the executor drops its mirror at the
        next plan. With `final_reason`, a final delta carrying it is emitted."""
        if seq.state is SeqState.RUNNING:
            self.blocks.free(seq.seq_id)
            self.running.remove(seq)
        elif seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
            self._unclaim(seq)
        if seq.on_executor:
            self._to_drop.append(seq.seq_id)
        seq.finish()
        del self.by_id[seq.seq_id]
        if final_reason is not None:
            self._emit(seq.request, scheduler_pb2.TokenDelta(seq_index=seq.index,
                                                             finish_reason=final_reason))
        if seq.request.finished:
            del self.requests[seq.request.request_id]

    def _emit(self, request: Request, delta: scheduler_pb2.TokenDelta) -> None:
        if not request.first_delta_sent:
            request.first_delta_sent = True
            delta.num_prompt_tokens = request.num_prompt_tokens
            delta.num_cached_prompt_tokens = request.num_cached_prompt_tokens
            delta.prompt_logprobs.extend(request.prompt_logprobs)
            delta.embedding.extend(request.embedding)
        request.emit(delta)


class _Budget:
    def __init__(self, tokens: int, seqs: int):
        self.tokens_left, self.seqs_left, self.used_tokens = tokens, seqs, 0

    def take(self, tokens: int) -> None:
        self.tokens_left -= tokens
        self.seqs_left -= 1
        self.used_tokens += tokens
