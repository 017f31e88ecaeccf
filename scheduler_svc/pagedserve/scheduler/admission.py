"""Admission: a request that could never run is rejected before it is queued, with a message
naming the field (docs/design.md §4); one arriving while the queue is full is refused at once, so
overload shows up as a fast, retryable error instead of unbounded waiting.

Admission also applies the gateway's request rules (runtime/request_rules.py) against the
executor the request lands on, whoever called Submit: nothing admitted can make the executor
refuse a plan (a refused plan costs the executor all its requests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pagedserve.runtime.request_rules import (
    RuleError,
    SamplingLimits,
    check_cache_salt,
    check_priority,
    check_sampling,
)
from pagedserve.scheduler.sequence import Request
from pagedserve.v1 import common_pb2, scheduler_pb2


class AdmissionError(ValueError):
    """The request can never fit; the message names the field and the numbers."""


class QueueFull(Exception):
    """Too many sequences wait already; the client should retry later (RESOURCE_EXHAUSTED)."""


def check_queue_room(num_waiting: int, max_queue_len: int) -> None:
    """Raises QueueFull when `max_queue_len` (0: no limit) sequences are waiting already.
    Only new requests are refused: running and queued ones go on untouched."""
    if max_queue_len and num_waiting >= max_queue_len:
        raise QueueFull(f"the scheduler's queue is full ({num_waiting} sequences waiting, "
                        f"--max-queue-len {max_queue_len}); retry later")


@dataclass(frozen=True)
class PoolLimits:
    """What one executor can hold (from its registration)."""

    max_model_len: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    vocab_size: int
    max_logprobs: int


def admit_request(request_id: str, prompt_token_ids: Sequence[int],
                  sampling: common_pb2.SamplingParams, priority: int, limits: PoolLimits,
                  emit: Callable[[scheduler_pb2.TokenDelta], None], *,
                  cache_salt: str = "",
                  resumed: Sequence[scheduler_pb2.ResumedSequence] = ()) -> Request:
    """The request, checked against `limits`; `resumed` (a resubmission, scheduler.proto)
    too: AdmissionError for anything that could never run there."""
    try:
        check_sampling(sampling, SamplingLimits.for_executor(
            limits.vocab_size, limits.max_logprobs, limits.max_num_seqs))
        check_priority(priority)
        check_cache_salt(cache_salt)
    except RuleError as exc:
        field = exc.field if exc.field in ("priority", "cache_salt") else f"sampling.{exc.field}"
        raise AdmissionError(f"{field}: {exc.rule}") from None
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise AdmissionError("prompt_token_ids: the prompt is empty")
    bad = next((t for t in prompt_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise AdmissionError(f"prompt_token_ids: token id {bad} is outside the vocabulary "
                             f"(size {limits.vocab_size})")
    if num_prompt >= limits.max_model_len:
        raise AdmissionError(f"prompt_token_ids: the prompt has {num_prompt} tokens, but the "
                             f"model's context limit is {limits.max_model_len} (prompt + at "
                             "least one output token)")
    blocks = -(-(num_prompt + 1) // limits.block_size)
    if blocks > limits.num_blocks:
        raise AdmissionError(f"prompt_token_ids: the prompt needs {blocks} KV blocks, more "
                             f"than the executor's whole pool ({limits.num_blocks})")
    together = _blocks_for_sequences(num_prompt, max(1, sampling.n), limits.block_size)
    if together > limits.num_blocks:
        raise AdmissionError(f"sampling.n: {sampling.n} sequences of a {num_prompt}-token "
                             f"prompt need {together} KV blocks together, more than the "
                             f"executor's whole pool ({limits.num_blocks})")
    room = limits.max_model_len - num_prompt
    max_output = min(sampling.max_tokens, room) if sampling.HasField("max_tokens") else room
    if resumed:
        check_resumed(resumed, max(1, sampling.n), num_prompt, max_output, limits)
    return Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                   sampling=sampling, max_output_tokens=max_output, priority=priority,
                   emit=emit, cache_salt=cache_salt.encode())


def _blocks_for_sequences(num_prompt: int, n: int, block_size: int) -> int:
    """Blocks the n sequences of a request hold together when each has its first output
    token's slot. They fork once the prompt but its last token is computed (sequence.py): the
    full blocks of those tokens are shared, and each sequence owns the rest (the fork copies
    the partly filled block)."""
    shared = (num_prompt - 1) // block_size
    return shared + n * (-(-(num_prompt + 1) // block_size) - shared)


def check_resumed(resumed: Sequence[scheduler_pb2.ResumedSequence], n: int, num_prompt: int,
                  max_output: int, limits: PoolLimits) -> None:
    """A resubmission names each of the n sequences, and every unfinished one can go on here:
    below its output budget (else it would have finished with LENGTH) and within the pool."""
    if len(resumed) != n:
        raise AdmissionError(f"resumed_sequences: {len(resumed)} entries, expected one per "
                             f"sequence (n = {n})")
    if all(entry.finished for entry in resumed):
        raise AdmissionError("resumed_sequences: every sequence has finished; nothing to resume")
    for index, entry in enumerate(resumed):
        name = f"resumed_sequences[{index}]"
        bad = next((t for t in entry.output_token_ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise AdmissionError(f"{name}.output_token_ids: token id {bad} is outside the "
                                 f"vocabulary (size {limits.vocab_size})")
        num_output = len(entry.output_token_ids)
        if entry.finished:
            continue
        if num_output >= max_output:
            raise AdmissionError(f"{name}: {num_output} output tokens, but the request may "
                                 f"generate at most {max_output} (max_tokens, context limit); "
                                 "an unfinished sequence must be below it")
        blocks = -(-(num_prompt + num_output + 1) // limits.block_size)
        if blocks > limits.num_blocks:
            raise AdmissionError(f"{name}: prompt and output tokens need {blocks} KV blocks, "
                                 f"more than the executor's whole pool ({limits.num_blocks})")
