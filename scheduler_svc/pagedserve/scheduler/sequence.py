"""Requests and the sequences they generate, as the scheduler tracks them.

A request with n > 1 starts as one sequence (index 0) that prefills the prompt up to its last
token; then n - 1 children fork from it, sharing its KV blocks, and every sequence computes the
last prompt token itself, so each samples its own first token (docs/design.md §3, parallel
sampling).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2, scheduler_pb2

_arrivals = itertools.count()


class SeqState(enum.Enum):
    WAITING = "waiting"  # queued: new, or preempted and to be recomputed
    RUNNING = "running"  # holds blocks on its executor
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    # Most output tokens per sequence (max_tokens, capped by the context limit).
    max_output_tokens: int
    priority: int
    # Receives every TokenDelta of the request, in order.
    emit: Callable[[scheduler_pb2.TokenDelta], None]
    # Prefix-cache namespace: blocks are shared only between requests of equal salts.
    cache_salt: bytes = b""
    arrival: int = field(default_factory=lambda: next(_arrivals))
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    # Prompt logprobs gathered over prefill chunks; sent with the first token.
    prompt_logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)
    # The pooled prompt (sampling.pooling); sent with the first token.
    embedding: list[float] = field(default_factory=list)
    first_delta_sent: bool = False
    # Executors lost while it ran on them (cluster.MAX_EXECUTOR_LOSSES bounds it).
    executor_losses: int = 0
    # Derived once (read on every step for every sequence).
    n: int = field(init=False)
    num_prompt_tokens: int = field(init=False)
    # Whether sequence 0 stops its prefill one token short, to fork before sampling.
    forks_first: bool = field(init=False)

    def __post_init__(self) -> None:
        self.n = max(1, self.sampling.n)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.forks_first = self.n > 1 and self.num_prompt_tokens > 1

    @property
    def prompt_logprobs_complete(self) -> bool:
        """All of them gathered (one per prompt token): a sequence that computes the prompt
        again (preempted, or a fork's child recomputed) adds none and clears none."""
        return len(self.prompt_logprobs) == self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return all(s.state is SeqState.FINISHED for s in self.seqs) and \
            len(self.seqs) == self.n


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int
    # Prompt plus every token generated and accepted so far.
    token_ids: list[int]
    state: SeqState = SeqState.WAITING
    # Tokens whose K/V are computed or scheduled to be (advanced when a step is planned).
    num_computed: int = 0
    # One entry per sample planned but not yet returned (more than one only with overlapped
    # steps): the lookahead (proposals to verify) of its step, oldest first, which is what
    # that step may have computed past num_computed by the time a later step runs.
    lookahead_in_flight: deque[int] = field(default_factory=deque)
    # Whether the executor holds a mirror of it (to be dropped when it leaves).
    on_executor: bool = False
    forked: bool = False
    seq_id: str = field(init=False)

    def __post_init__(self) -> None:
        request = self.request
        self.seq_id = request.request_id if request.n == 1 else \
            f"{request.request_id}/{self.index}"

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def num_in_flight(self) -> int:
        """Samples planned but not yet returned."""
        return len(self.lookahead_in_flight)

    @property
    def num_known_tokens(self) -> int:
        """Tokens the executor will know at the next step: accepted plus in flight."""
        return len(self.token_ids) + self.num_in_flight

    def compute_target(self) -> int:
        """Tokens this sequence should have computed before it can sample next."""
        if self.index == 0 and self.request.forks_first and not self.forked:
            return self.request.num_prompt_tokens - 1
        return self.num_known_tokens

    # -- state changes: the only places `state` is written -----------------------------

    def start_running(self, num_computed: int) -> None:
        """Placed on its executor, its first `num_computed` tokens' K/V cached or computed."""
        self.state, self.num_computed, self.on_executor = SeqState.RUNNING, num_computed, True

    def preempt(self) -> None:
        """Back to the queue without its blocks: recomputed from its tokens when it runs
        again. A sample in flight still arrives (and is accepted) before it is rescheduled."""
        self.state, self.num_computed, self.on_executor = SeqState.WAITING, 0, False

    def move_to_new_executor(self) -> None:
        """Its executor was lost: queued on another, from scratch, with nothing in flight."""
        self.preempt()
        self.lookahead_in_flight.clear()

    def finish(self) -> None:
        self.state, self.on_executor = SeqState.FINISHED, False

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Queue order: priority (lower first), then arrival, then sequence index."""
        return (self.request.priority, self.request.arrival, self.index)


def resumed_sequences(request: Request,
                      resumed: SequenceType[scheduler_pb2.ResumedSequence]) -> list[Sequence]:
    """All n sequences of a resubmitted request (its scheduler went away mid-stream), each
    holding the prompt plus the output tokens its client has received, like sequences taken
    over from a lost executor; those the client saw end are made finished. Returns the
    unfinished ones, for StepScheduler.requeue to recompute. Nothing forks: every sequence
    exists already (sequence 0 counts as forked, so it computes the whole prompt itself)."""
    request.first_delta_sent = True  # usage, cached and prompt logprobs were streamed
    for index, entry in enumerate(resumed):
        seq = Sequence(request=request, index=index,
                       token_ids=[*request.prompt_token_ids, *entry.output_token_ids],
                       forked=True)
        request.seqs.append(seq)
        if entry.finished:
            seq.finish()
    return [seq for seq in request.seqs if seq.state is not SeqState.FINISHED]
