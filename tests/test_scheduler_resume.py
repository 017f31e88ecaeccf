"""The scheduler's side of a resubmission (issue 17; SubmitRequest.resumed_sequences): a request
whose scheduler went away after streaming part of its output, resubmitted to a fresh scheduler
with the output tokens its client had received, streams exactly the rest of what an undisturbed
run gives: the max_tokens budget, min_tokens and the penalties count the resumed tokens, a
finished sequence is not run again, nothing is sent twice (tokens, logprobs, first-delta
fields). Admission refuses a resubmission that could not go on, and a resubmission skips the
queue limit (it was admitted once) and, like every request, is acknowledged as queued."""

import asyncio

import grpc
import pytest

from pagedserve.entrypoints.offline import LLM
from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.resume import QUEUED_HEADER
from pagedserve.runtime.serving import free_ports
from pagedserve.scheduler.admission import AdmissionError, PoolLimits, admit_request
from pagedserve.scheduler.cluster import Cluster, ClusterConfig, Submission
from pagedserve.scheduler.server import SchedulerService
from pagedserve.testing.processes import internal_auth
from pagedserve.testing.registrations import registration
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * BLOCK * 2 * 16 * 4  # layers x (K, V) x tokens x kv heads x dim x f32
PROMPT = list(range(40, 52))
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def make_llm(tiny_llama_dir):
    def make() -> LLM:
        return LLM(str(tiny_llama_dir), block_size=BLOCK, dtype="float32", max_model_len=128,
                   kv_cache_gib=512.5 * BYTES_PER_BLOCK / 2**30)
    return make


async def stream(llm: LLM, request_id: str, params: common_pb2.SamplingParams,
                 resumed=(), stop_after: int | None = None) -> list[scheduler_pb2.TokenDelta]:
    """The deltas of one request on a fresh scheduler over a fresh executor mirror; with
    `stop_after`, only those received before the total output reaches it (the rest is what
    a scheduler going away loses)."""
    cluster = Cluster(ClusterConfig(), lambda address, session: llm.make_handle())
    deltas, failures, done = [], [], asyncio.Event()
    unfinished = {i for i in range(max(1, params.n))} - {
        i for i, entry in enumerate(resumed) if entry.finished}

    def emit(delta: scheduler_pb2.TokenDelta) -> None:
        if stop_after is not None and sum(len(d.token_ids) for d in deltas) >= stop_after:
            done.set()
            return
        deltas.append(delta)
        if delta.finish_reason:
            unfinished.discard(delta.seq_index)
        if not unfinished:
            done.set()

    def fail(code: str, message: str) -> None:
        failures.append(message)
        done.set()
    cluster.register(registration("a", llm))
    cluster.submit("tiny", Submission(request_id, PROMPT, params, 0, emit,
                                      resumed=tuple(resumed)), fail)
    await asyncio.wait_for(done.wait(), timeout=60)
    assert not failures
    cluster.finished(request_id)
    for pool in cluster.pools.values():
        pool.task.cancel()
        await pool.handle.close()
    return deltas


def by_sequence(deltas, n: int) -> list[list[int]]:
    tokens = [[] for _ in range(n)]
    for delta in deltas:
        tokens[delta.seq_index] += delta.token_ids
    return tokens


SAMPLINGS = {
    # Penalties and min_tokens count output tokens; with them a resumed sequence that took
    # its output for prompt (or restarted its count) would pick other tokens.
    "greedy-penalties": common_pb2.SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, n=2, min_tokens=10, repetition_penalty=1.3,
        presence_penalty=1.5, frequency_penalty=1.0, logprobs=2, prompt_logprobs=1),
    "seeded": common_pb2.SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, n=2, seed=7,
                                        logprobs=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLINGS)
def test_a_resubmitted_request_streams_the_rest_of_the_undisturbed_output(make_llm, name):
    params = SAMPLINGS[name]
    llm = make_llm()

    async def run():
        reference = await stream(llm, "ref", params)
        head = await stream(llm, "r", params, stop_after=9)
        received = by_sequence(head, 2)
        resumed = [scheduler_pb2.ResumedSequence(output_token_ids=tokens) for tokens in received]
        tail = await stream(llm, "r.resume1", params, resumed)
        return reference, head, received, tail

    reference, head, received, tail = asyncio.run(run())
    undisturbed = by_sequence(reference, 2)
    assert all(len(tokens) == MAX_TOKENS for tokens in undisturbed)
    if params.HasField("seed"):  # sequence i draws from its own stream
        assert undisturbed[0] != undisturbed[1]
    assert 0 < sum(map(len, received)) < 2 * MAX_TOKENS
    rest = by_sequence(tail, 2)
    assert [a + b for a, b in zip(received, rest, strict=True)] == undisturbed
    # Each token's logprobs once; the first delta's fields only in the first run.
    for deltas in (head, tail):
        assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert not any(d.num_prompt_tokens or d.prompt_logprobs for d in tail)
    assert [d.finish_reason for d in tail if d.finish_reason] == \
        [common_pb2.FINISH_REASON_LENGTH] * 2


@pytest.mark.slow
def test_a_finished_sequence_is_not_run_again(make_llm):
    params = SAMPLINGS["greedy-penalties"]
    llm = make_llm()

    async def run():
        reference = by_sequence(await stream(llm, "ref", params), 2)
        resumed = [scheduler_pb2.ResumedSequence(output_token_ids=reference[0][:3],
                                                 finished=True),  # a stop string, say
                   scheduler_pb2.ResumedSequence(output_token_ids=reference[1][:5])]
        return reference, await stream(llm, "r", params, resumed)

    reference, tail = asyncio.run(run())
    assert {d.seq_index for d in tail} == {1}
    assert by_sequence(tail, 2)[1] == reference[1][5:]


LIMITS = PoolLimits(max_model_len=64, num_blocks=100, block_size=4, max_num_seqs=8,
                    vocab_size=100, max_logprobs=5)


@pytest.mark.parametrize("resumed, words", [
    ([([1], False)], "expected one per sequence (n = 2)"),
    ([([1], True), ([], True)], "every sequence has finished"),
    ([([1], False), ([100], False)], "resumed_sequences[1].output_token_ids: token id 100"),
    ([([1] * 10, False), ([], False)], "resumed_sequences[0]: 10 output tokens"),
    ([([1] * 61, True), ([1] * 61, False)], "resumed_sequences[1]: 61 output tokens"),
])
def test_admission_refuses_a_resubmission_that_cannot_go_on(resumed, words):
    entries = [scheduler_pb2.ResumedSequence(output_token_ids=tokens, finished=finished)
               for tokens, finished in resumed]
    sampling = common_pb2.SamplingParams(n=2, max_tokens=10)
    if sum(len(e.output_token_ids) for e in entries) > 100:
        sampling.ClearField("max_tokens")  # bounded by the context instead
    with pytest.raises(AdmissionError) as error:
        admit_request("r", [1, 2, 3], sampling, 0, LIMITS, lambda delta: None, resumed=entries)
    assert words in str(error.value)


def test_a_resubmission_skips_the_queue_limit_and_every_request_is_acknowledged():
    """No executor: requests wait in the scheduler. With --max-queue-len 1 the second new
    request is refused; a resubmission is queued, and so acknowledged before any token."""
    async def main():
        (port,) = free_ports(1)
        cluster = Cluster(ClusterConfig(), make_handle=None)
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(
            SchedulerService(cluster, None, max_queue_len=1), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        async with internal_auth(Role.GATEWAY).channel(f"127.0.0.1:{port}") as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=4)
            first = stub.Submit(scheduler_pb2.SubmitRequest(
                request_id="a", prompt_token_ids=[1, 2], sampling=sampling))
            assert dict(await first.initial_metadata())[QUEUED_HEADER] == "1"
            refused = stub.Submit(scheduler_pb2.SubmitRequest(
                request_id="b", prompt_token_ids=[1, 2], sampling=sampling))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await refused.read()
            assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            resumed = stub.Submit(scheduler_pb2.SubmitRequest(
                request_id="c", prompt_token_ids=[1, 2], sampling=sampling,
                resumed_sequences=[scheduler_pb2.ResumedSequence(output_token_ids=[3])]))
            assert dict(await resumed.initial_metadata())[QUEUED_HEADER] == "1"
            assert {o.request_id for o in cluster.orphans} == {"a", "c"}
            first.cancel()
            resumed.cancel()
        await server.stop(None)
    asyncio.run(main())
