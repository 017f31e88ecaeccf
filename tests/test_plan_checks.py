"""The executor's step-plan checks (executor_svc/pagedserve/executor/plan_checks.py) on their
own, each limit at its boundary: what the plan may hold exactly at the limit passes, one past
it is refused (the request alone, or the plan as a whole) with the exact message the scheduler
logs. The runner's handling of refusals (the rest of the step runs, outputs still match
transformers): tests/test_runner.py."""

from __future__ import annotations

import re

import pytest

from pagedserve.executor.plan_checks import PlanError, RunnerLimits, check_plan
from pagedserve.v1 import common_pb2, executor_pb2

LIMITS = RunnerLimits(num_blocks=8, block_size=4, max_num_seqs=3, max_num_batched_tokens=12,
                      max_model_len=16, max_logprobs=5)
VOCAB = 100
Work = executor_pb2.ScheduledWork


def new(rid: str, tokens: list[int], blocks=(0,), computed: int = 0,
        **sampling) -> executor_pb2.NewRequest:
    return executor_pb2.NewRequest(request_id=rid, token_ids=tokens,
                                   num_prompt_tokens=len(tokens), block_ids=list(blocks),
                                   num_computed_tokens=computed,
                                   sampling=common_pb2.SamplingParams(**sampling))


def check(requests=None, **plan) -> dict[str, str]:
    return check_plan(executor_pb2.StepPlan(**plan), requests or {}, LIMITS, VOCAB)


def plan_refused(message: str, requests=None, **plan) -> None:
    with pytest.raises(PlanError, match=f"^{re.escape(message)}$"):
        check(requests, **plan)


def test_a_well_formed_plan_refuses_nothing_and_changes_nothing():
    requests = {"a": (5, 4, 2)}  # known, computed, blocks
    assert check(requests, new_requests=[new("b", [1, 2, 3])],
                 work=[Work(request_id="a", num_tokens=1), Work(request_id="b", num_tokens=3)],
                 dropped_request_ids=[]) == {}
    assert requests == {"a": (5, 4, 2)}


def test_step_limits_hold_exactly_at_their_boundary():
    three = [new(r, [1] * 4, [i]) for i, r in enumerate("abc")]
    assert check(new_requests=three, work=[Work(request_id=r, num_tokens=4) for r in "abc"]) \
        == {}  # 3 requests, 12 tokens: both limits exactly
    plan_refused("work: 4 requests > max_num_seqs 3",
                 new_requests=[*three, new("d", [1], [3])],
                 work=[Work(request_id=r, num_tokens=1) for r in "abcd"])
    plan_refused("work: 13 tokens > max_num_batched_tokens 12",
                 new_requests=[*three[:2], new("c", [1] * 5, [2, 3])],
                 work=[Work(request_id="a", num_tokens=4), Work(request_id="b", num_tokens=4),
                       Work(request_id="c", num_tokens=5)])
    plan_refused("work: request 'a' scheduled twice", new_requests=three[:1],
                 work=[Work(request_id="a", num_tokens=1)] * 2)


def test_block_ids_below_the_pool_size():
    assert check(block_copies=[executor_pb2.BlockCopy(src_block_id=0, dst_block_id=7)]) == {}
    plan_refused("block_copies: block id 8 out of range (the pool has 8 blocks)",
                 block_copies=[executor_pb2.BlockCopy(src_block_id=8, dst_block_id=0)])
    assert check(new_requests=[new("a", [1], [7])]) == {}
    assert check(new_requests=[new("a", [1], [8])]) == {
        "a": "new_requests['a'].block_ids: block id 8 out of range (the pool has 8 blocks)"}
    assert check({"a": (5, 4, 1)}, work=[Work(request_id="a", num_tokens=1,
                                              new_block_ids=[8])]) == {
        "a": "work['a'].new_block_ids: block id 8 out of range (the pool has 8 blocks)"}


def test_a_new_request_s_boundaries():
    assert check(new_requests=[new("a", [99])]) == {}
    assert check(new_requests=[new("a", [1, 100])]) == {
        "a": "new_requests['a'].token_ids: token id 100 out of the vocabulary (size 100)"}
    assert check(new_requests=[new("a", [])]) == {
        "a": "new_requests['a']: 0 token ids for 0 prompt tokens"}
    short = new("a", [1, 2])
    short.num_prompt_tokens = 3
    assert check(new_requests=[short]) == {
        "a": "new_requests['a']: 2 token ids for 3 prompt tokens"}
    assert check(new_requests=[new("a", [1, 2], computed=1)]) == {}
    assert check(new_requests=[new("a", [1, 2], computed=2)]) == {
        "a": "new_requests['a'].num_computed_tokens: 2, but it has 2 tokens"}
    assert check(new_requests=[new("a", [1], logprobs=5)]) == {}
    assert check(new_requests=[new("a", [1], logprobs=6)]) == {
        "a": "new_requests['a'].sampling.logprobs: must be <= 5 (the executor's "
             "--max-logprobs)"}
    assert check({"a": (2, 1, 1)}, new_requests=[new("a", [1])]) == {
        "a": "new_requests['a']: the request already exists"}


def test_a_fork_takes_its_parent_s_tokens():
    requests = {"p": (6, 5, 2)}
    fork = executor_pb2.NewRequest(request_id="c", fork_of="p", block_ids=[0, 2],
                                   num_computed_tokens=5)
    assert check(requests, new_requests=[fork], work=[Work(request_id="c", num_tokens=1)]) == {}
    fork.num_computed_tokens = 6
    assert check(requests, new_requests=[fork]) == {
        "c": "new_requests['c'].num_computed_tokens: 6, but it has 6 tokens"}
    orphan = executor_pb2.NewRequest(request_id="c", fork_of="q", block_ids=[0])
    assert check(requests, new_requests=[orphan]) == {
        "c": "new_requests['c'].fork_of: unknown request 'q'"}


def test_a_refused_request_is_gone_for_the_rest_of_the_plan():
    """The executor drops a refused request's mirror: a fork of it in the same plan has no
    parent (it used to be a fork of a mirror about to vanish)."""
    refused = check({"a": (2, 1, 1)}, new_requests=[
        new("a", [1]), executor_pb2.NewRequest(request_id="b", fork_of="a", block_ids=[1])])
    assert refused == {"a": "new_requests['a']: the request already exists",
                       "b": "new_requests['b'].fork_of: unknown request 'a'"}


def test_work_boundaries():
    requests = {"a": (9, 4, 2)}  # 5 uncomputed tokens, blocks for 8
    assert check(requests, work=[Work(request_id="a", num_tokens=4)]) == {}
    assert check(requests, work=[Work(request_id="a", num_tokens=5)]) == {
        "a": "work['a']: 2 blocks cannot hold 9 tokens"}
    assert check(requests, work=[Work(request_id="a", num_tokens=5, new_block_ids=[2])]) == {}
    assert check(requests, work=[Work(request_id="a", num_tokens=6, new_block_ids=[2])]) == {
        "a": "work['a'].num_tokens: 6, but the request has 5 uncomputed tokens"}
    assert check(requests, work=[Work(request_id="a", num_tokens=0)]) == {
        "a": "work['a'].num_tokens: 0, but the request has 5 uncomputed tokens"}
    assert check({"a": (17, 15, 4)}, work=[Work(request_id="a", num_tokens=1)]) == {}
    assert check({"a": (17, 16, 5)}, work=[Work(request_id="a", num_tokens=1)]) == {
        "a": "work['a']: 17 tokens > max_model_len 16"}
    assert check(work=[Work(request_id="z", num_tokens=1)]) == {
        "z": "work: unknown request 'z'"}


def test_drops_apply_before_arrivals_and_work():
    requests = {"a": (2, 1, 1)}
    assert check(requests, dropped_request_ids=["a"], new_requests=[new("a", [1, 2])],
                 work=[Work(request_id="a", num_tokens=2)]) == {}
    assert check(requests, dropped_request_ids=["a"],
                 work=[Work(request_id="a", num_tokens=1)]) == {
        "a": "work: unknown request 'a'"}
    assert check(dropped_request_ids=["ghost"]) == {
        "ghost": "dropped_request_ids: unknown request 'ghost'"}
