"""The model runner: applies a step plan to the executor's mirror of each request, runs the
forward pass over the flat batch, samples, and returns per-request results (docs/design.md §2, §5).

Under tensor parallelism every rank runs a ModelRunner over its slice of the model: rank 0
relays each plan to the others through its `TensorParallelGroup` before running it, every rank
applies it and runs the same forward pass, and rank 0 samples and broadcasts the sampled tokens
so that every mirror appends the same ones (tp_group.py owns the group). Only rank 0's results
are sent.

With speculative decoding (speculative.py) a decode may verify proposals in its forward pass:
n-gram ones each rank finds in its own mirror, or a draft model's (draft_model.py), which rank
0 runs and broadcasts.

A plan is validated completely before anything changes (plan_checks.py): a request whose part
is malformed is refused alone, its mirror dropped, and the rest of the step runs; the
StepResult names it and why. A plan malformed as a whole raises PlanError and leaves every
mirror as it was. Either way the executor keeps serving: one bad request costs that request,
not the batch or the executor.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from torch import nn

from pagedserve.executor.batch import FlatBatch, ScheduledSequence, build_flat_batch
from pagedserve.executor.decode_graphs import DecodeGraphs
from pagedserve.executor.draft_model import DraftModel, DraftSequence
from pagedserve.executor.plan_checks import PlanError, RunnerLimits, check_plan
from pagedserve.executor.sampler import (
    Sampler,
    SamplerOutput,
    SequenceSamplingState,
    prompt_logprobs,
    sequence_seed,
)
from pagedserve.executor.speculative import SpeculativeConfig, accepted_length, propose_ngram
from pagedserve.executor.structured_output import (
    GrammarCompiler,
    SequenceGrammar,
    new_bitmask,
)
from pagedserve.executor.tp_group import NO_GROUP, TensorParallelGroup
from pagedserve.executor.transfers import tensor_on
from pagedserve.runtime.grammars import GrammarError
from pagedserve.v1 import common_pb2, executor_pb2

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunnerMemory:
    """What the runner's model holds in memory on this rank, as the executor describes it (and
    /metrics shows it): quantization ("" for none) and weight bytes, KV cache dtype and bytes
    per block."""

    quantization: str = ""
    weight_bytes: int = 0
    kv_cache_dtype: str = ""
    kv_bytes_per_block: int = 0


@dataclass
class RequestMirror:
    """What the executor knows of one running request, kept up to date by the plans."""

    token_ids: list[int]  # prompt + every generated token
    num_prompt_tokens: int
    num_computed: int  # leading tokens whose K/V are in the cache
    block_ids: list[int]
    seq_index: int
    sampling: SequenceSamplingState
    # Leading tokens whose K/V are in the draft model's cache (draft_model.py), when there is
    # one: num_computed or one less.
    num_draft_cached: int = 0
    # Structured output's matcher (rank 0, which samples; None without a grammar).
    grammar: SequenceGrammar | None = None
    # Mean pooling: the sum of the prompt's final hidden states computed so far (float32).
    pooled_sum: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: nn.Module, limits: RunnerLimits, eos_token_ids: Sequence[int],
                 device: torch.device, group: TensorParallelGroup = NO_GROUP,
                 memory: RunnerMemory = RunnerMemory(),
                 speculative: SpeculativeConfig | None = None, draft: DraftModel | None = None,
                 grammars: GrammarCompiler | None = None, graphs: DecodeGraphs | None = None):
        self.model = model
        self.graphs = graphs  # decode steps' graphs (CUDA or CPU), when captured
        self.grammars = grammars  # rank 0's
        self.speculative = speculative
        self.draft = draft  # rank 0's, for method draft_model
        self.limits = limits
        self.memory = memory
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self.group = group
        self.tp = group.tp
        self.sampler = Sampler()
        self.requests: dict[str, RequestMirror] = {}

    def reset(self) -> None:
        """Forget every request (a new scheduler stream starts from nothing)."""
        self.group.relay_reset()
        self.requests.clear()

    def close(self) -> None:
        """Stops the tensor-parallel followers and leaves the group (nothing for one rank)."""
        self.group.close()
        if self.grammars is not None:
            self.grammars.close()

    # -- plan application ---------------------------------------------------------------

    def step(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        """`execute`, with a malformed plan answered as a StepResult carrying the error."""
        self.group.relay_plan(plan)
        try:
            return self.execute(plan)
        except PlanError as exc:
            log.warning("malformed step plan", step_id=plan.step_id, error=str(exc))
            return executor_pb2.StepResult(step_id=plan.step_id, error=str(exc))
        except Exception:
            self.group.fail(plan.step_id)
            raise

    def execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        started = time.perf_counter()
        refused = self._validate(plan)
        for request_id in refused:
            self.requests.pop(request_id, None)
        for request_id in plan.dropped_request_ids:
            if request_id not in refused:
                del self.requests[request_id]
        for new in plan.new_requests:
            if new.request_id not in refused:
                self.requests[new.request_id] = self._mirror(new)
        work = [w for w in plan.work if w.request_id not in refused]
        for w in work:
            self.requests[w.request_id].block_ids.extend(w.new_block_ids)
        self._copy_blocks(plan.block_copies)
        outputs, num_drafts = self._run(work, refused) if work else ([], 0)
        if refused:
            log.warning("requests refused from a step plan", step_id=plan.step_id,
                        refused=refused)
        return executor_pb2.StepResult(
            step_id=plan.step_id, outputs=outputs, execute_seconds=time.perf_counter() - started,
            num_draft_tokens=num_drafts,
            failed_requests=[executor_pb2.RequestFailure(request_id=r, message=m)
                             for r, m in refused.items()])

    def _mirror(self, new: executor_pb2.NewRequest) -> RequestMirror:
        # A cached prefix was computed by the draft too, all but maybe a fork's last token.
        num_draft_cached = new.num_computed_tokens
        if new.fork_of:
            parent = self.requests[new.fork_of]
            token_ids, num_prompt = list(parent.token_ids), parent.num_prompt_tokens
            params = parent.sampling.params
            num_draft_cached = min(num_draft_cached, parent.num_draft_cached)
            grammar = parent.grammar and parent.grammar.fork()
        else:
            token_ids, num_prompt, params = list(new.token_ids), new.num_prompt_tokens, new.sampling
            grammar = None
            if params.HasField("structured_output") and self.grammars is not None:
                # Checked with the plan; compiles in a thread while the prompt is computed.
                grammar = SequenceGrammar(self.grammars.compile(params.structured_output),
                                          token_ids[num_prompt:])
        sampling = SequenceSamplingState(
            params=params, prompt_token_ids=token_ids[:num_prompt],
            output_token_ids=token_ids[num_prompt:], eos_token_ids=self.eos_token_ids,
            seed=sequence_seed(params, new.seq_index))
        return RequestMirror(token_ids=token_ids, num_prompt_tokens=num_prompt,
                             num_computed=new.num_computed_tokens, block_ids=list(new.block_ids),
                             seq_index=new.seq_index, sampling=sampling,
                             num_draft_cached=num_draft_cached, grammar=grammar)

    def _copy_blocks(self, copies: Sequence[executor_pb2.BlockCopy]) -> None:
        if not copies:
            return
        src = tensor_on([c.src_block_id for c in copies], self.device)
        dst = tensor_on([c.dst_block_id for c in copies], self.device)
        models = [self.model] + ([self.draft.model] if self.draft else [])
        for module in (m for model in models for m in model.modules()):
            cache = getattr(module, "kv_cache", None)
            if cache is not None:
                for tensor in cache:
                    tensor[dst] = tensor[src]

    def _validate(self, plan: executor_pb2.StepPlan) -> dict[str, str]:
        state = {rid: (len(m.token_ids), m.num_computed, len(m.block_ids))
                 for rid, m in self.requests.items()}
        return check_plan(plan, state, self.limits, self.model.config.vocab_size)

    # -- execution ----------------------------------------------------------------------

    def _run(self, work: Sequence[executor_pb2.ScheduledWork], failed: dict[str, str]
             ) -> tuple[list[executor_pb2.RequestOutput], int]:
        """The step's outputs, and how many proposals it verified; requests that fail while it
        runs (a grammar that did not compile) go into `failed`, their mirrors dropped."""
        proposals = self._propose(work)
        # Single-token queries (decodes without proposals) first: the attention path batches
        # them.
        ordered = sorted(work, key=lambda w: w.num_tokens + len(proposals.get(w.request_id, ()))
                         != 1)
        mirrors = [self.requests[w.request_id] for w in ordered]
        drafts = [proposals.get(w.request_id, []) for w in ordered]
        seqs = [ScheduledSequence(
                    m.token_ids[m.num_computed:m.num_computed + w.num_tokens] + d,
                    m.num_computed, m.block_ids)
                for m, w, d in zip(mirrors, ordered, drafts, strict=True)]
        batch = build_flat_batch(seqs, self.limits.block_size, self.device)
        # Each sequence's last row, counted on the host (reading the batch's would sync).
        last_rows = [end - 1 for end in itertools.accumulate(len(s.token_ids) for s in seqs)]
        # A request samples when this step computes its last known token; with proposals, at
        # the proposals' positions too (what the target draws there verifies them).
        samples = [i for i, (m, w) in enumerate(zip(mirrors, ordered, strict=True))
                   if m.num_computed + w.num_tokens == len(m.token_ids)]
        # Queued before the forward pass, so the logits follow it at once.
        rows = tensor_on([row for i in samples
                          for row in range(last_rows[i] - len(drafts[i]), last_rows[i] + 1)],
                         self.device, torch.long)
        with torch.inference_mode():
            hidden = self._forward(batch)
            sampled, token_ids = None, []
            if samples:
                logits = self.model.compute_logits(hidden[rows])
                if logits is not None:  # rank 0
                    states = [state for i in samples
                              for state in _verification_states(mirrors[i].sampling, drafts[i])]
                    self._mask_by_grammars(
                        states, [(ordered[i].request_id, mirrors[i], drafts[i]) for i in samples],
                        logits.shape[-1], failed)
                    sampled = self.sampler(logits, states)
                    chosen = sampled.token_ids
                else:
                    chosen = torch.empty(rows.shape[0], dtype=torch.long, device=self.device)
                token_ids = self.tp.broadcast_from_first(chosen).tolist()
            # Each sequence's first row: its rows are its tokens, then its proposals.
            first_rows = [last - len(d) - w.num_tokens + 1
                          for last, d, w in zip(last_rows, drafts, ordered, strict=True)]
            prompt_lps = self._prompt_logprobs(hidden, first_rows, mirrors, ordered)
            pooled = self._pool(hidden, first_rows, mirrors, ordered)
        outputs = {}
        for i, mirror in enumerate(mirrors):
            mirror.num_computed += ordered[i].num_tokens
            mirror.num_draft_cached = mirror.num_computed
            if i in prompt_lps or i in pooled:
                outputs[i] = executor_pb2.RequestOutput(request_id=ordered[i].request_id,
                                                        prompt_logprobs=prompt_lps.get(i, ()),
                                                        embedding=pooled.get(i, ()))
        row = 0
        for i in samples:
            mirror, draft = mirrors[i], drafts[i]
            drawn = token_ids[row:row + len(draft) + 1]
            accepted = accepted_length(draft, drawn)
            mirror.num_computed += accepted  # the accepted proposals' K/V were computed
            # The draft ran every proposal but the last.
            mirror.num_draft_cached += min(accepted, max(len(draft) - 1, 0))
            output = outputs.setdefault(i, executor_pb2.RequestOutput(
                request_id=ordered[i].request_id))
            if mirror.grammar is not None:
                mirror.grammar.consume(drawn[:accepted + 1])
            for j, token in enumerate(drawn[:accepted + 1]):
                mirror.token_ids.append(token)
                mirror.sampling.output_token_ids.append(token)
                output.token_ids.append(token)
                if sampled is not None and mirror.sampling.params.HasField("logprobs"):
                    output.logprobs.append(_position_logprobs(
                        sampled, row + j, token, mirror.sampling.params.logprobs))
            row += len(draft) + 1
        for request_id in failed:
            self.requests.pop(request_id, None)
        return [outputs[i] for i in sorted(outputs) if ordered[i].request_id not in failed], \
            sum(map(len, drafts))

    def _forward(self, batch: FlatBatch) -> torch.Tensor:
        """The batch's final hidden states: replayed from a decode graph when one fits it
        (decode_graphs.py), else run eagerly."""
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is None:
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
        return hidden

    def _mask_by_grammars(self, states: list[SequenceSamplingState],
                          sampling: list[tuple[str, RequestMirror, list[int]]], vocab_size: int,
                          failed: dict[str, str]) -> None:
        """Gives the sampling rows of sequences with a grammar its masks (states are per row,
        each sequence's k + 1 rows in turn); a grammar that failed to compile fails its
        request."""
        if not any(mirror.grammar for _, mirror, _ in sampling):
            return
        bitmask = new_bitmask(len(states), vocab_size)
        row = 0
        for request_id, mirror, drafts in sampling:
            rows = range(row, row + len(drafts) + 1)
            row = rows.stop
            if mirror.grammar is None:
                continue
            try:
                mirror.grammar.fill_masks(bitmask, rows.start, drafts)
            except GrammarError as exc:
                failed[request_id] = str(exc)
                continue
            for r in rows:
                states[r] = dataclasses.replace(states[r], token_mask=bitmask[r])

    def _propose(self, work: Sequence[executor_pb2.ScheduledWork]) -> dict[str, list[int]]:
        """The proposals each request verifies this step."""
        config = self.speculative
        if config is None:
            return {}
        rooms = {w.request_id: self._room(self.requests[w.request_id], w)
                 for w in work if w.num_lookahead_tokens}
        if config.method == "ngram":
            return {rid: propose_ngram(np.asarray(self.requests[rid].token_ids), room,
                                       config.prompt_lookup_min,
                                       config.prompt_lookup_max).tolist()
                    for rid, room in rooms.items() if room > 0}
        proposed = []
        if self.draft is not None:
            # Every request runs through the draft, keeping its cache up to date.
            proposed = self.draft.propose([self._draft_sequence(w, rooms.get(w.request_id, 0))
                                           for w in work])
        if not any(room > 0 for room in rooms.values()):
            return {}
        proposed = self._from_first_rank(proposed, len(work))
        return {w.request_id: p for w, p in zip(work, proposed, strict=True) if p}

    def _room(self, mirror: RequestMirror, work: executor_pb2.ScheduledWork) -> int:
        """How many proposals a request may verify after its last known token: at most the
        plan's budget, and no more than its blocks hold, its max_tokens leave or the model
        length allows (0 or less: none)."""
        known = len(mirror.token_ids)
        params = mirror.sampling.params
        room = min(work.num_lookahead_tokens,
                   len(mirror.block_ids) * self.limits.block_size - known,
                   self.limits.max_model_len - known - 1)
        if params.HasField("max_tokens"):
            room = min(room, params.max_tokens - len(mirror.sampling.output_token_ids) - 1)
        return room

    def _draft_sequence(self, work: executor_pb2.ScheduledWork, room: int) -> DraftSequence:
        mirror = self.requests[work.request_id]
        return DraftSequence(mirror.token_ids, mirror.num_draft_cached,
                             mirror.num_computed + work.num_tokens, mirror.block_ids,
                             max(room, 0))

    def _from_first_rank(self, proposed: list[list[int]], num_work: int) -> list[list[int]]:
        """Rank 0's proposals on every rank (as they are with one rank)."""
        if self.tp.size == 1:
            return proposed
        table = torch.full((num_work, self.limits.max_lookahead_tokens), -1, dtype=torch.long)
        for row, tokens in enumerate(proposed):
            table[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        table = self.tp.broadcast_from_first(table.to(self.device)).tolist()
        return [[t for t in row if t >= 0] for row in table]

    def _pool(self, hidden, first_rows, mirrors, ordered) -> dict[int, list[float]]:
        """The pooled prompts (sampling.pooling) completed this step, by position in
        `ordered`."""
        result = {}
        for i, (mirror, work) in enumerate(zip(mirrors, ordered, strict=True)):
            start = mirror.num_computed  # not yet advanced for this step
            if start < mirror.num_prompt_tokens and mirror.sampling.params.HasField("pooling"):
                vector = _pooled(hidden, first_rows[i], mirror, start, work.num_tokens)
                if vector is not None:
                    result[i] = vector
        return result

    def _prompt_logprobs(self, hidden, first_rows, mirrors, ordered) -> dict[int, list]:
        """Logprobs of each prompt token computed this step (after the first), when asked."""
        result = {}
        for i, (mirror, work) in enumerate(zip(mirrors, ordered, strict=True)):
            params = mirror.sampling.params
            start = mirror.num_computed  # not yet advanced for this step
            if not params.HasField("prompt_logprobs") or start >= mirror.num_prompt_tokens:
                continue
            # The row of position q predicts the token at q + 1; prompt positions 1 .. P-1 are
            # predicted, so q runs over this chunk's positions up to P - 2.
            predicting = range(start, min(start + work.num_tokens, mirror.num_prompt_tokens - 1))
            entries = [common_pb2.PositionLogprobs()] if start == 0 else []  # token 0: none
            if predicting:
                rows = torch.arange(first_rows[i], first_rows[i] + len(predicting))
                logits = self.model.compute_logits(hidden[rows])
                if logits is None:  # not rank 0: took part in gathering the logits, no more
                    continue
                targets = torch.tensor(mirror.token_ids[start + 1:predicting[-1] + 2])
                chosen, ranks, top_ids, top_lps = prompt_logprobs(
                    logits, targets.to(hidden.device), params.prompt_logprobs)
                entries += [_logprob_entry(int(t), float(c), int(r), ti, tl)
                            for t, c, r, ti, tl in zip(targets.tolist(), chosen.tolist(),
                                                       ranks.tolist(), top_ids.tolist(),
                                                       top_lps.tolist(), strict=True)]
            result[i] = entries
        return result


def _pooled(hidden: torch.Tensor, first_row: int, mirror: RequestMirror, start: int,
            num_tokens: int) -> list[float] | None:
    """A pooling request's part of a step: a mean's sum grows by the prompt rows computed; the
    vector once the step computes the prompt's last position (None before)."""
    pooling = mirror.sampling.params.pooling
    end = min(start + num_tokens, mirror.num_prompt_tokens)
    if pooling.type == common_pb2.Pooling.TYPE_MEAN:
        chunk = hidden[first_row:first_row + end - start].float().sum(dim=0)
        mirror.pooled_sum = chunk if mirror.pooled_sum is None else mirror.pooled_sum + chunk
    if end < mirror.num_prompt_tokens:
        return None
    vector = mirror.pooled_sum / mirror.num_prompt_tokens \
        if pooling.type == common_pb2.Pooling.TYPE_MEAN \
        else hidden[first_row + end - start - 1].float()
    if pooling.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector.tolist()


def _verification_states(state: SequenceSamplingState,
                         drafts: list[int]) -> list[SequenceSamplingState]:
    """The sampling state of each position a sequence draws at this step: after its known
    tokens, then after each proposal in turn (penalties, min_tokens and the seed's position
    see the proposals before it)."""
    return [state, *(dataclasses.replace(state, output_token_ids=state.output_token_ids
                                         + drafts[:j]) for j in range(1, len(drafts) + 1))]


def _logprob_entry(token_id: int, logprob: float, rank: int, top_ids: list[int],
                   top_logprobs: list[float]) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(
        chosen=common_pb2.TokenLogprob(token_id=token_id, logprob=logprob, rank=rank),
        top=[common_pb2.TokenLogprob(token_id=t, logprob=lp, rank=k + 1)
             for k, (t, lp) in enumerate(zip(top_ids, top_logprobs, strict=True))])


def _position_logprobs(sampled: SamplerOutput, row: int, token_id: int,
                       num_top: int) -> common_pb2.PositionLogprobs:
    return _logprob_entry(token_id, float(sampled.logprobs[row]), int(sampled.ranks[row]),
                          sampled.top_ids[row, :num_top].tolist(),
                          sampled.top_logprobs[row, :num_top].tolist())
