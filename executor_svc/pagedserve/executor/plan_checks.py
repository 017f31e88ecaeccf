"""What a step plan must satisfy before the executor applies it (docs/design.md §2, §5).

The scheduler is trusted to plan well, but nothing that reaches a port is trusted to be well
formed: a plan is checked completely against the state it will meet before anything changes.

- A request whose part is malformed (unknown request, token or block id out of range, more
  tokens than it holds, sampling values the executor cannot honour) is refused alone, with the
  reason; the rest of the step runs.
- A plan malformed as a whole (over the step's limits, a request scheduled twice, a block copy
  outside the pool) raises PlanError, and nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pagedserve.runtime.request_rules import RuleError, SamplingLimits, check_sampling
from pagedserve.v1 import common_pb2, executor_pb2


class PlanError(ValueError):
    """The step plan, or one request's part of it, is malformed; the message names the
    problem."""


@dataclass(frozen=True)
class RunnerLimits:
    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_logprobs: int
    # Proposals a decode may verify (--speculative-config's num_speculative_tokens; 0: none).
    max_lookahead_tokens: int = 0


# A request as a plan meets it: (known tokens, computed tokens, blocks).
RequestState = tuple[int, int, int]


def check_plan(plan: executor_pb2.StepPlan, requests: Mapping[str, RequestState],
               limits: RunnerLimits, vocab_size: int) -> dict[str, str]:
    """The requests whose part of `plan` is malformed, each with the reason, given the
    executor's `requests` before the plan; PlanError when the plan as a whole is."""
    state = dict(requests)  # after this plan's drops and arrivals
    refused: dict[str, str] = {}

    def refuse(request_id: str, error: PlanError) -> None:
        refused.setdefault(request_id, str(error))
        state.pop(request_id, None)

    for rid in plan.dropped_request_ids:
        if rid in state:
            del state[rid]
        else:
            refuse(rid, PlanError(f"dropped_request_ids: unknown request {rid!r}"))
    for new in plan.new_requests:
        try:
            state[new.request_id] = _check_new(new, state, limits, vocab_size)
        except PlanError as exc:
            refuse(new.request_id, exc)
    if len(plan.work) > limits.max_num_seqs:
        raise PlanError(f"work: {len(plan.work)} requests > max_num_seqs {limits.max_num_seqs}")
    total, seen = 0, set()
    for work in plan.work:
        if work.request_id in seen:
            raise PlanError(f"work: request {work.request_id!r} scheduled twice")
        seen.add(work.request_id)
        total += work.num_tokens + work.num_lookahead_tokens  # proposals are computed too
        if work.request_id not in refused:
            try:
                _check_work(work, state, limits)
            except PlanError as exc:
                refuse(work.request_id, exc)
    if total > limits.max_num_batched_tokens:
        raise PlanError(f"work: {total} tokens > max_num_batched_tokens "
                        f"{limits.max_num_batched_tokens}")
    for copy in plan.block_copies:
        _check_blocks("block_copies", [copy.src_block_id, copy.dst_block_id], limits)
    return refused


def _check_new(new: executor_pb2.NewRequest, state: Mapping[str, RequestState],
               limits: RunnerLimits, vocab_size: int) -> RequestState:
    """A new request's state; PlanError if its part is malformed."""
    name = f"new_requests[{new.request_id!r}]"
    if new.request_id in state:
        raise PlanError(f"{name}: the request already exists")
    if new.fork_of:
        if new.fork_of not in state:
            raise PlanError(f"{name}.fork_of: unknown request {new.fork_of!r}")
        num_tokens = state[new.fork_of][0]
    else:
        num_tokens = len(new.token_ids)
        if not num_tokens or new.num_prompt_tokens > num_tokens:
            raise PlanError(f"{name}: {num_tokens} token ids for {new.num_prompt_tokens} "
                            "prompt tokens")
        _check_token_ids(f"{name}.token_ids", new.token_ids, vocab_size)
        try:
            check_sampling(new.sampling, SamplingLimits(vocab_size, limits.max_logprobs))
        except RuleError as exc:
            raise PlanError(f"{name}.sampling.{exc}") from None
    if new.num_computed_tokens >= num_tokens:
        raise PlanError(f"{name}.num_computed_tokens: {new.num_computed_tokens}, but it "
                        f"has {num_tokens} tokens")
    if new.sampling.pooling.type == common_pb2.Pooling.TYPE_MEAN and new.num_computed_tokens:
        raise PlanError(f"{name}.num_computed_tokens: {new.num_computed_tokens}, but a mean "
                        "pooling needs every prompt position computed")
    _check_blocks(f"{name}.block_ids", new.block_ids, limits)
    return num_tokens, new.num_computed_tokens, len(new.block_ids)


def _check_work(work: executor_pb2.ScheduledWork, state: Mapping[str, RequestState],
                limits: RunnerLimits) -> None:
    rid = work.request_id
    if rid not in state:
        raise PlanError(f"work: unknown request {rid!r}")
    known, computed, blocks = state[rid]
    if work.num_tokens < 1 or computed + work.num_tokens > known:
        raise PlanError(f"work[{rid!r}].num_tokens: {work.num_tokens}, but the request has "
                        f"{known - computed} uncomputed tokens")
    if computed + work.num_tokens > limits.max_model_len:
        raise PlanError(f"work[{rid!r}]: {computed + work.num_tokens} tokens > "
                        f"max_model_len {limits.max_model_len}")
    if work.num_lookahead_tokens > limits.max_lookahead_tokens:
        raise PlanError(f"work[{rid!r}].num_lookahead_tokens: {work.num_lookahead_tokens} > "
                        f"this executor's {limits.max_lookahead_tokens} (its speculative "
                        "num_speculative_tokens)")
    if work.num_lookahead_tokens and not (work.num_tokens == 1 and computed + 1 == known):
        raise PlanError(f"work[{rid!r}].num_lookahead_tokens: only a decode of the request's "
                        "last known token verifies proposals")
    _check_blocks(f"work[{rid!r}].new_block_ids", work.new_block_ids, limits)
    blocks += len(work.new_block_ids)
    if blocks * limits.block_size < computed + work.num_tokens:
        raise PlanError(f"work[{rid!r}]: {blocks} blocks cannot hold "
                        f"{computed + work.num_tokens} tokens")


def _check_blocks(field: str, block_ids: Sequence[int], limits: RunnerLimits) -> None:
    bad = [b for b in block_ids if b >= limits.num_blocks]
    if bad:
        raise PlanError(f"{field}: block id {bad[0]} out of range "
                        f"(the pool has {limits.num_blocks} blocks)")


def _check_token_ids(field: str, token_ids: Iterable[int], vocab_size: int) -> None:
    bad = [t for t in token_ids if t >= vocab_size]
    if bad:
        raise PlanError(f"{field}: token id {bad[0]} out of the vocabulary "
                        f"(size {vocab_size})")
