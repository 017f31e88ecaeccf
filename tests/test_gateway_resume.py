"""The gateway resubmits a request whose scheduler goes away mid-stream (issue 17): against a
scripted Scheduler gRPC server that streams known outputs and breaks its streams on cue, or
stops and comes back on the same port, the choices a client gets through
gateway/pagedserve/gateway/generation.py are those of an undisturbed run, and each
resubmission carries exactly what the client had received. A request the scheduler never
queued, a request's own error, a scheduler that does not come back within the window and a
request that keeps losing its scheduler all end with the error, as before resuming."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from pagedserve.gateway import scheduler_client
from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.generation import Usage, generate
from pagedserve.gateway.scheduler_client import SchedulerClient, ServedModel
from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.resume import FINAL_METADATA, QUEUED_METADATA
from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import internal_auth
from pagedserve.testing.tiny_models import byte_level_tokenizer
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

TOKENIZER = byte_level_tokenizer()
# What each sequence generates (multi-byte characters, so that a cut can fall inside one).
TEXTS = ["héllo wörld, the quick fox ënds here", "ünd so weiter, immer weiter gehts"]
PROMPT = [5, 6, 7]


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


OUTPUTS = [ids(text) for text in TEXTS]


@dataclass
class Cut:
    """How one Submit call ends: after `after` deltas (None: never), with `code`; `final`
    marks it the request's own error (runtime/resume.py); `queued` False fails before the
    request is queued."""

    after: int | None
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    final: bool = False
    queued: bool = True


@dataclass
class ScriptedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Streams OUTPUTS[i] for sequence i, one token per delta, round robin, continuing after a
    resubmission's output tokens; ends sequence i with LENGTH at max_tokens. Each call ends as
    the next of `cuts` says (then as `Cut(None)`)."""

    cuts: list[Cut] = field(default_factory=list)
    submitted: list[scheduler_pb2.SubmitRequest] = field(default_factory=list)
    stopped: list[tuple[str, int]] = field(default_factory=list)
    # Set once a call has sent `pause_after` deltas (then the call waits).
    pause_after: int | None = None
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    async def Submit(self, request, context):
        self.submitted.append(request)
        cut = self.cuts.pop(0) if self.cuts else Cut(None)
        if not cut.queued:
            await context.abort(cut.code, "scripted: not queued")
        await context.send_initial_metadata(QUEUED_METADATA)
        n = max(1, request.sampling.n)
        resumed = list(request.resumed_sequences) or [scheduler_pb2.ResumedSequence()] * n
        produced = [len(r.output_token_ids) for r in resumed]
        live = [i for i in range(n) if not resumed[i].finished]
        sent = 0
        while live:
            for i in list(live):
                if (request.request_id, i) in self.stopped:
                    live.remove(i)
                    yield scheduler_pb2.TokenDelta(seq_index=i,
                                                   finish_reason=common_pb2.FINISH_REASON_STOP)
                    continue
                if sent == cut.after:
                    await context.abort(cut.code, "scripted cut",
                                        FINAL_METADATA if cut.final else ())
                if sent == self.pause_after:
                    self.paused.set()
                    await asyncio.Event().wait()
                delta = scheduler_pb2.TokenDelta(seq_index=i,
                                                 token_ids=[OUTPUTS[i][produced[i]]])
                produced[i] += 1
                if not request.resumed_sequences and sent == 0:
                    delta.num_prompt_tokens = len(request.prompt_token_ids)
                if produced[i] == request.sampling.max_tokens:
                    delta.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    live.remove(i)
                sent += 1
                yield delta
                await asyncio.sleep(0)

    async def StopSequence(self, request, context):
        self.stopped.append((request.request_id, request.seq_index))
        return scheduler_pb2.StopSequenceResponse()


async def serve(scheduler: ScriptedScheduler, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@dataclass
class Run:
    texts: dict[int, str]
    tokens: dict[int, list[int]]
    reasons: dict[int, str]


async def collect(client: SchedulerClient, sampling: common_pb2.SamplingParams) -> Run:
    served = ServedModel(info=common_pb2.ModelInfo(model_id="m"), tokenizer=TOKENIZER)
    run = Run({}, {}, {})
    async for choice in generate(client, served, "req-1", PROMPT, sampling, Usage()):
        run.texts[choice.index] = run.texts.get(choice.index, "") + choice.text
        run.tokens.setdefault(choice.index, []).extend(choice.token_ids)
        if choice.finish_reason:
            run.reasons[choice.index] = choice.finish_reason
    return run


def with_scheduler(scheduler: ScriptedScheduler, test) -> None:
    """Runs `test(client, port)` against `scheduler` served on a free port."""
    async def main():
        (port,) = free_ports(1)
        server = await serve(scheduler, port)
        client = SchedulerClient(f"127.0.0.1:{port}", internal_auth(Role.GATEWAY))
        try:
            await asyncio.wait_for(test(client, port), 60)
        finally:
            await client.close()
            await server.stop(None)
    asyncio.run(main())


def undisturbed(sampling: common_pb2.SamplingParams) -> Run:
    runs = []

    async def test(client, port):
        runs.append(await collect(client, sampling))
    with_scheduler(ScriptedScheduler(), test)
    return runs[0]


SAMPLING = common_pb2.SamplingParams(n=2, max_tokens=min(map(len, OUTPUTS)))


def test_the_undisturbed_reference_is_the_scripted_output():
    """The reference itself, against the outputs the script streams (an independent check)."""
    run = undisturbed(SAMPLING)
    n = SAMPLING.max_tokens
    assert run.tokens == {0: OUTPUTS[0][:n], 1: OUTPUTS[1][:n]}
    assert run.texts == {i: TOKENIZER.decode(OUTPUTS[i][:n]) for i in (0, 1)}
    assert run.reasons == {0: "length", 1: "length"}


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_stream_cut_after_queueing_goes_on_where_it_was(code):
    # Cuts fall after 2 and 5 deltas (the first inside sequence 1's "ü"), as many as
    # a request may lose schedulers and still be resubmitted.
    cuts = [2, 5]
    assert len(cuts) == scheduler_client.MAX_SCHEDULER_LOSSES - 1
    scheduler = ScriptedScheduler([Cut(after, code) for after in cuts])
    runs = []

    async def test(client, port):
        runs.append(await collect(client, SAMPLING))
    with_scheduler(scheduler, test)
    assert runs[0] == undisturbed(SAMPLING)
    first, *again = scheduler.submitted
    assert not first.resumed_sequences and len(again) == len(cuts)
    # Each resubmission: the same request under a fresh id, with what the client had.
    assert len({s.request_id for s in scheduler.submitted}) == len(cuts) + 1
    received = 0
    for cut, resubmission in zip(cuts, again, strict=True):
        received += cut
        assert resubmission.prompt_token_ids == PROMPT
        assert resubmission.sampling == SAMPLING
        outputs = [list(s.output_token_ids) for s in resubmission.resumed_sequences]
        assert sum(map(len, outputs)) == received
        assert outputs == [OUTPUTS[i][:len(outputs[i])] for i in (0, 1)]
        assert not any(s.finished for s in resubmission.resumed_sequences)


def test_a_scheduler_that_stops_and_comes_back_on_its_address_resumes_the_stream():
    """The scripted scheduler's server stops mid-stream (its calls end as a dying process's
    do) and a new one starts on the same port a moment later."""
    first = ScriptedScheduler(pause_after=4)
    second = ScriptedScheduler()
    runs = []

    async def main():
        (port,) = free_ports(1)
        server = await serve(first, port)
        client = SchedulerClient(f"127.0.0.1:{port}", internal_auth(Role.GATEWAY))
        run = asyncio.create_task(collect(client, SAMPLING))
        await asyncio.wait_for(first.paused.wait(), 30)
        await server.stop(None)
        await asyncio.sleep(1.5)  # gone long enough for the channel to back off
        server = await serve(second, port)
        try:
            runs.append(await asyncio.wait_for(run, 30))
        finally:
            await client.close()
            await server.stop(None)
    asyncio.run(main())
    assert runs[0] == undisturbed(SAMPLING)
    (resubmission,) = second.submitted
    assert [len(s.output_token_ids) for s in resubmission.resumed_sequences] == [2, 2]


def test_a_stop_string_s_sequence_is_not_resumed_and_is_stopped_under_the_new_id():
    sampling = common_pb2.SamplingParams(n=2, max_tokens=20, stop=["wörld"])
    # Cut before the stop string ends sequence 0, then after (while sequence 1 goes on).
    scheduler = ScriptedScheduler([Cut(6), Cut(24)])
    runs = []

    async def test(client, port):
        runs.append(await collect(client, sampling))
    with_scheduler(scheduler, test)
    assert runs[0].texts[0] == "héllo " and runs[0].reasons[0] == "stop"
    assert runs[0].texts[1] == TOKENIZER.decode(OUTPUTS[1][:20])
    first, second, third = scheduler.submitted
    assert [s.finished for s in second.resumed_sequences] == [False, False]
    assert [s.finished for s in third.resumed_sequences] == [True, False]
    assert scheduler.stopped == [(second.request_id, 0)]  # the attempt then running


@pytest.mark.parametrize("cut, status", [
    (Cut(None, grpc.StatusCode.UNAVAILABLE, queued=False), 503),  # never got in: at once
    (Cut(3, grpc.StatusCode.INVALID_ARGUMENT), 400),  # the request's own errors
    (Cut(3, grpc.StatusCode.INTERNAL), 500),
    (Cut(3, grpc.StatusCode.UNAVAILABLE, final=True), 503),  # e.g. no executor in time
])
def test_errors_that_are_not_a_lost_scheduler_reach_the_client(cut, status):
    scheduler = ScriptedScheduler([cut])

    async def test(client, port):
        with pytest.raises(GatewayError) as error:
            await collect(client, SAMPLING)
        assert error.value.status == status
    with_scheduler(scheduler, test)
    assert len(scheduler.submitted) == 1


def test_a_request_that_keeps_losing_its_scheduler_fails():
    scheduler = ScriptedScheduler([Cut(2)] * scheduler_client.MAX_SCHEDULER_LOSSES)

    async def test(client, port):
        with pytest.raises(GatewayError) as error:
            await collect(client, SAMPLING)
        assert error.value.status == 503 and "lost its scheduler" in error.value.message
    with_scheduler(scheduler, test)
    assert len(scheduler.submitted) == scheduler_client.MAX_SCHEDULER_LOSSES


def test_a_scheduler_that_does_not_come_back_within_the_window_is_a_503(monkeypatch):
    monkeypatch.setattr(scheduler_client, "RESUME_WINDOW_S", 1.0)
    # Queued and cut, then never queued again (a scheduler that refuses connections).
    scheduler = ScriptedScheduler([Cut(2)] + [Cut(None, queued=False)] * 100)

    async def test(client, port):
        with pytest.raises(GatewayError) as error:
            await collect(client, SAMPLING)
        assert error.value.status == 503 and "did not take it back" in error.value.message
    with_scheduler(scheduler, test)
    assert 3 <= len(scheduler.submitted) < 100
