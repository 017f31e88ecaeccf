"""Admission (scheduler_svc/pagedserve/scheduler/admission.py) as a client sees it: what a
request admitted becomes, and the exact refusal each limit gives at its boundary (the messages
reach clients as the gRPC details and the HTTP error message, so they are behaviour). The rules
shared with the gateway are in tests/test_request_surface.py; through a real stack in
tests/test_limits.py."""

from __future__ import annotations

import re

import pytest

from pagedserve.scheduler.admission import (
    AdmissionError,
    PoolLimits,
    QueueFull,
    admit_request,
    check_queue_room,
)
from pagedserve.v1 import common_pb2, scheduler_pb2

S = common_pb2.SamplingParams
LIMITS = PoolLimits(max_model_len=64, num_blocks=16, block_size=4, max_num_seqs=4,
                    vocab_size=100, max_logprobs=5)


def admit(prompt, sampling=None, limits=LIMITS, **kwargs):
    return admit_request("r", prompt, sampling or S(), 0, limits, emit=print, **kwargs)


def refused(message: str, prompt, sampling=None, limits=LIMITS, **kwargs) -> None:
    with pytest.raises(AdmissionError, match=f"^{re.escape(message)}$"):
        admit(prompt, sampling, limits, **kwargs)


def test_an_admitted_request_carries_what_was_asked():
    emit = []
    request = admit_request("req-1", [5, 6, 7], S(max_tokens=10, n=2), 7, LIMITS,
                            emit=emit.append, cache_salt="tenant")
    assert (request.request_id, request.prompt_token_ids, request.max_output_tokens,
            request.priority, request.cache_salt, request.n) == \
        ("req-1", [5, 6, 7], 10, 7, b"tenant", 2)
    request.emit(scheduler_pb2.TokenDelta(seq_index=0))
    assert len(emit) == 1
    assert admit([1]).cache_salt == b""  # no salt unless one is given


def test_output_is_bounded_by_max_tokens_and_the_context():
    assert admit([1] * 10).max_output_tokens == 54  # no max_tokens: up to the context limit
    assert admit([1] * 10, S(max_tokens=54)).max_output_tokens == 54
    assert admit([1] * 10, S(max_tokens=55)).max_output_tokens == 54
    assert admit([1] * 10, S(max_tokens=3)).max_output_tokens == 3


def test_prompt_boundaries_and_their_messages():
    admit([1])  # one token is a prompt
    refused("prompt_token_ids: the prompt is empty", [])
    admit([99])
    refused("prompt_token_ids: token id 100 is outside the vocabulary (size 100)", [1, 100])
    refused("prompt_token_ids: the prompt has 64 tokens, but the model's context limit is 64 "
            "(prompt + at least one output token)", [1] * 64)
    small = PoolLimits(**{**vars(LIMITS), "num_blocks": 8, "max_model_len": 100})
    admit([1] * 31, limits=small)
    # 33 + 1 tokens need 9 blocks of 4 (a whole number of them: never "8.5")
    refused("prompt_token_ids: the prompt needs 9 KV blocks, more than the executor's whole "
            "pool (8)", [1] * 33, limits=small)


def test_n_sequences_boundary_message():
    limits = PoolLimits(**{**vars(LIMITS), "num_blocks": 15, "max_num_seqs": 8})
    admit([1] * 50, S(n=3), limits)
    refused("sampling.n: 4 sequences of a 50-token prompt need 16 KV blocks together, more "
            "than the executor's whole pool (15)", [1] * 50, S(n=4), limits)
    # 51 tokens fork after 50: 12 full blocks shared, 52 tokens in 13 blocks, so 1 own each.
    admit([1] * 51, S(n=2), PoolLimits(**{**vars(limits), "num_blocks": 14}))
    refused("sampling.n: 2 sequences of a 51-token prompt need 14 KV blocks together, more "
            "than the executor's whole pool (13)", [1] * 51, S(n=2),
            PoolLimits(**{**vars(limits), "num_blocks": 13}))
    # A one-token prompt does not fork: each sequence holds its own block.
    admit([1], S(n=4), PoolLimits(**{**vars(LIMITS), "num_blocks": 4}))
    refused("sampling.n: 4 sequences of a 1-token prompt need 4 KV blocks together, more than "
            "the executor's whole pool (3)", [1], S(n=4),
            PoolLimits(**{**vars(LIMITS), "num_blocks": 3}))


def test_n_is_capped_at_64_even_when_the_executor_runs_more_sequences():
    """The fixed cap holds for every caller of Submit, not only behind the gateway."""
    roomy = PoolLimits(**{**vars(LIMITS), "max_num_seqs": 256, "num_blocks": 1024})
    admit([1], S(n=64), roomy)
    refused("sampling.n: must be <= 64", [1], S(n=65), roomy)


@pytest.mark.parametrize("kwargs, field", [
    ({"sampling": S(logprobs=6)}, "sampling.logprobs"),
    ({"priority": 1001}, "priority"),
    ({"cache_salt": "s" * 257}, "cache_salt"),
])
def test_rule_errors_name_the_submit_request_field(kwargs, field):
    """Sampling fields are named by their path in SubmitRequest; priority and cache_salt are
    top-level fields."""
    with pytest.raises(AdmissionError) as error:
        admit_request("r", [1], kwargs.get("sampling", S()), kwargs.get("priority", 0), LIMITS,
                      emit=print, cache_salt=kwargs.get("cache_salt", ""))
    assert str(error.value).split(":")[0] == field


def test_the_queue_refuses_at_its_length_and_zero_means_no_limit():
    check_queue_room(num_waiting=1, max_queue_len=2)
    check_queue_room(num_waiting=10**6, max_queue_len=0)
    with pytest.raises(QueueFull, match=re.escape(
            "the scheduler's queue is full (2 sequences waiting, --max-queue-len 2); "
            "retry later")):
        check_queue_room(num_waiting=2, max_queue_len=2)


def resumed(*outputs: list[int], finished: tuple[bool, ...] = ()):
    return [scheduler_pb2.ResumedSequence(output_token_ids=out,
                                          finished=finished[i] if finished else False)
            for i, out in enumerate(outputs)]


def test_a_resumed_request_names_each_sequence():
    admit([1, 2], S(max_tokens=8), resumed=resumed([3]))  # n unset: one sequence
    admit([1, 2], S(max_tokens=8, n=2), resumed=resumed([3], [4, 5]))
    refused("resumed_sequences: 1 entries, expected one per sequence (n = 2)", [1, 2],
            S(max_tokens=8, n=2), resumed=resumed([3]))
    refused("resumed_sequences: every sequence has finished; nothing to resume", [1, 2],
            S(max_tokens=8, n=2), resumed=resumed([3], [4], finished=(True, True)))


def test_a_resumed_sequence_must_be_able_to_go_on_here():
    refused("resumed_sequences[0].output_token_ids: token id 100 is outside the vocabulary "
            "(size 100)", [1, 2], S(max_tokens=8), resumed=resumed([100]))
    admit([1, 2], S(max_tokens=8), resumed=resumed([3] * 7))
    refused("resumed_sequences[0]: 8 output tokens, but the request may generate at most 8 "
            "(max_tokens, context limit); an unfinished sequence must be below it", [1, 2],
            S(max_tokens=8), resumed=resumed([3] * 8))
    # A finished sequence may sit at its budget; only unfinished ones must go on.
    admit([1, 2], S(max_tokens=2, n=2), resumed=resumed([3, 3], [3], finished=(True, False)))
    pool = PoolLimits(**{**vars(LIMITS), "num_blocks": 4, "max_model_len": 64})
    admit([1] * 4, S(), pool, resumed=resumed([3] * 11))  # 4 + 11 + 1 = 16 tokens: 4 blocks
    refused("resumed_sequences[0]: prompt and output tokens need 5 KV blocks, more than the "
            "executor's whole pool (4)", [1] * 4, S(), pool, resumed=resumed([3] * 12))
