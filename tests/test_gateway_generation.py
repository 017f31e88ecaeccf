"""gateway/pagedserve/gateway/generation.py over a scripted scheduler stream: when a stop string
ends one choice of an n > 1 request, the scheduler is told to stop that sequence (and only that one)
while the other choices go on; when the last choice stops, or the scheduler finished that sequence
with the same delta, nothing is sent (leaving the stream aborts the whole request). The submit
carries the request as given; special tokens, kept stop strings and finish reasons reach the
choices; the latency metrics are checked against a scripted clock. Beam search (`beam_choices`)
returns `search`'s beams over a toy model as choices, and counts its request in the gateway's
metrics and usage as `generate` does."""

import asyncio
import math
import random

import pytest

from pagedserve.gateway import generation
from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.generation import Usage, beam_choices, generate
from pagedserve.gateway.metrics import METRICS
from pagedserve.gateway.scheduler_client import NO_DEADLINE, Deadline, ServedModel
from pagedserve.runtime.beam_search import BeamSearchParams, search, step_sampling
from pagedserve.testing.tiny_models import byte_level_tokenizer
from pagedserve.v1 import common_pb2, scheduler_pb2

TOKENIZER = byte_level_tokenizer()


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


class ScriptedScheduler:
    """Streams the given deltas; records the submit, its deadline and the sequences the gateway
    stops. `strict_end`: reading past the last delta fails the test (the gateway must leave the
    stream as soon as every choice has finished: leaving aborts the request on the scheduler)."""

    def __init__(self, deltas: list[scheduler_pb2.TokenDelta], strict_end: bool = False):
        self.deltas = deltas
        self.strict_end = strict_end
        self.stopped: list[tuple[str, int]] = []
        self.submits: list[tuple[scheduler_pb2.SubmitRequest, object]] = []

    async def generate(self, submit, deadline):
        self.submits.append((submit, deadline))
        for delta in self.deltas:
            yield delta
        assert not self.strict_end, "the gateway read on after every choice had finished"

    def stop_sequence(self, request_id: str, seq_index: int) -> None:
        self.stopped.append((request_id, seq_index))


def delta(seq_index: int, text: str, finish: int = 0) -> scheduler_pb2.TokenDelta:
    return scheduler_pb2.TokenDelta(seq_index=seq_index, token_ids=ids(text),
                                    finish_reason=finish)


def run(scheduler: ScriptedScheduler, n: int, stop: list[str]) -> dict[int, tuple[str, str]]:
    served = ServedModel(info=common_pb2.ModelInfo(model_id="m"), tokenizer=TOKENIZER)
    sampling = common_pb2.SamplingParams(n=n, stop=stop, max_tokens=50)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}

    async def collect():
        async for choice in generate(scheduler, served, "req-1", ids("hi"), sampling, Usage()):
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    asyncio.run(collect())
    return {i: (texts[i], reasons[i]) for i in texts}


def test_a_stop_string_stops_only_its_sequence_on_the_scheduler():
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([
        delta(0, "a b"), delta(1, "x y"), delta(0, " END more"), delta(1, " z"),
        delta(0, " ignored", length),  # sent before the scheduler heard of the stop
        delta(1, " w", length)])
    result = run(scheduler, n=2, stop=["END"])
    assert result == {0: ("a b ", "stop"), 1: ("x y z w", "length")}
    assert scheduler.stopped == [("req-1", 0)]


def test_the_last_choice_to_stop_sends_nothing():
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([delta(1, "b", length), delta(0, "a END"), delta(0, "x")])
    assert run(scheduler, n=2, stop=["END"]) == {1: ("b", "length"), 0: ("a ", "stop")}
    assert scheduler.stopped == []  # leaving the stream aborts the request instead


def test_a_stop_string_in_the_scheduler_s_last_delta_sends_nothing():
    """The scheduler finished that sequence already: there is nothing to stop."""
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([
        delta(0, "a"), delta(1, "x"), delta(0, " END", length), delta(1, " y", length)])
    assert run(scheduler, n=2, stop=["END"]) == {0: ("a ", "stop"), 1: ("x y", "length")}
    assert scheduler.stopped == []


class BeamScheduler:
    """Each step's submit: two candidate tokens; cached prompt tokens, all but the last."""

    async def generate(self, submit, deadline):
        top = [common_pb2.TokenLogprob(token_id=token, logprob=-rank, rank=rank)
               for rank, token in enumerate(ids("ab"), 1)]
        yield scheduler_pb2.TokenDelta(
            seq_index=0, token_ids=[top[0].token_id],
            logprobs=[common_pb2.PositionLogprobs(chosen=top[0], top=top)],
            num_prompt_tokens=len(submit.prompt_token_ids),
            num_cached_prompt_tokens=len(submit.prompt_token_ids) - 1,
            finish_reason=common_pb2.FINISH_REASON_LENGTH)


def test_beam_search_counts_its_request_as_generate_does():
    served = ServedModel(info=common_pb2.ModelInfo(model_id="m"), tokenizer=TOKENIZER)
    prompt = ids("hi")

    def sample(name, **labels):
        return METRICS.registry.get_sample_value(name, labels) or 0.0
    before = (sample("pagedserve_prompt_tokens_total"),
              sample("pagedserve_requests_finished_total", finish_reason="length"),
              sample("pagedserve_e2e_request_latency_seconds_count"))
    usage = Usage()
    choices = asyncio.run(beam_choices(BeamScheduler(), served, "req-1", prompt,
                                       BeamSearchParams(beam_width=2, max_tokens=3), usage))
    assert [c.finish_reason for c in choices] == ["length", "length"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 6)
    assert usage.cached_tokens == len(prompt) - 1  # the first step's, the prompt's own
    after = (sample("pagedserve_prompt_tokens_total"),
             sample("pagedserve_requests_finished_total", finish_reason="length"),
             sample("pagedserve_e2e_request_latency_seconds_count"))
    assert [b - a for a, b in zip(before, after, strict=True)] == [len(prompt), 2, 1]


def test_text_held_back_for_a_stop_string_is_sent_when_the_sequence_ends_otherwise():
    """A choice that ends by length while its text ends in a prefix of a stop string ("EN" of
    "END") gets that tail: it was held back only in case the stop string followed (issue 18)."""
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([delta(0, "a b"), delta(0, " EN", length)])
    assert run(scheduler, n=1, stop=["END"]) == {0: ("a b EN", "length")}


SERVED = ServedModel(
    info=common_pb2.ModelInfo(model_id="m", eos_token_ids=[TOKENIZER.eos_token_id]),
    tokenizer=TOKENIZER)


def collect(scheduler: ScriptedScheduler, sampling: common_pb2.SamplingParams, **options
            ) -> tuple[list, Usage]:
    """Every choice delta `generate` yields for the prompt "hi", and the usage it filled in."""
    usage = Usage()

    async def gather():
        return [c async for c in generate(scheduler, SERVED, "req-1", ids("hi"), sampling, usage,
                                          **options)]
    return asyncio.run(gather()), usage


def test_the_submit_carries_the_request_as_given():
    deadline = Deadline.after(30)
    sampling = common_pb2.SamplingParams(max_tokens=5, seed=7, stop=["x"])
    scheduler = ScriptedScheduler([delta(0, "ab", common_pb2.FINISH_REASON_LENGTH)])
    collect(scheduler, sampling, priority=3, deadline=deadline, cache_salt="salt")
    [(submit, given_deadline)] = scheduler.submits
    assert submit == scheduler_pb2.SubmitRequest(
        request_id="req-1", model="m", prompt_token_ids=ids("hi"), sampling=sampling,
        priority=3, cache_salt="salt")
    assert given_deadline is deadline
    scheduler = ScriptedScheduler([delta(0, "ab", common_pb2.FINISH_REASON_LENGTH)])
    collect(scheduler, sampling)
    [(submit, given_deadline)] = scheduler.submits
    assert (submit.priority, submit.cache_salt, given_deadline) == (0, "", NO_DEADLINE)


def test_a_single_choice_leaves_the_stream_when_it_finishes():
    """n unset (0) is one choice: its finish ends the request without reading on."""
    scheduler = ScriptedScheduler([delta(0, "a"), delta(0, "b", common_pb2.FINISH_REASON_LENGTH)],
                                  strict_end=True)
    choices, usage = collect(scheduler, common_pb2.SamplingParams(max_tokens=2))
    assert ["".join(c.text for c in choices), choices[-1].finish_reason] == ["ab", "length"]
    assert [c.token_ids for c in choices] == [ids("a"), ids("b")]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids("hi")), 2)


def test_a_stop_string_after_another_choice_finished_sends_nothing():
    """The second choice is the last one running when its stop string comes (issue 18)."""
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([delta(0, "a", length), delta(1, "b END")], strict_end=True)
    assert run(scheduler, n=2, stop=["END"]) == {0: ("a", "length"), 1: ("b ", "stop")}
    assert scheduler.stopped == []


def test_special_tokens_are_skipped_unless_the_request_keeps_them():
    eos = TOKENIZER.eos_token_id
    deltas = [scheduler_pb2.TokenDelta(seq_index=0, token_ids=ids("a") + [eos],
                                       finish_reason=common_pb2.FINISH_REASON_STOP,
                                       stop_token_id=eos)]
    for sampling, text in [(common_pb2.SamplingParams(), "a"),
                           (common_pb2.SamplingParams(skip_special_tokens=True), "a"),
                           (common_pb2.SamplingParams(skip_special_tokens=False), "a<|im_end|>")]:
        [choice], _ = collect(ScriptedScheduler(deltas), sampling)
        assert (choice.text, choice.finish_reason, choice.stop_reason) == (text, "stop", eos)


def test_a_stop_string_is_kept_when_the_request_asks():
    sampling = common_pb2.SamplingParams(stop=["END"], include_stop_str_in_output=True)
    choices, _ = collect(ScriptedScheduler([delta(0, "a END b")]), sampling)
    assert "".join(c.text for c in choices) == "a END"
    assert (choices[-1].finish_reason, choices[-1].stop_reason) == ("stop", "END")


def test_a_finish_reason_this_gateway_does_not_know_is_a_stop():
    """A newer scheduler's reason (the contract's enums are open) still ends the choice."""
    [choice], _ = collect(ScriptedScheduler([delta(0, "a", finish=99)]),
                          common_pb2.SamplingParams())
    assert (choice.finish_reason, choice.stop_reason) == ("stop", None)


class FakeClock:
    """generation.py's `time`: each reading one second after the last."""

    def __init__(self, start: float):
        self.now = start

    def monotonic(self) -> float:
        self.now += 1
        return self.now


def metric(name: str, **labels) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


LATENCIES = ["pagedserve_time_to_first_token_seconds", "pagedserve_inter_token_latency_seconds",
             "pagedserve_e2e_request_latency_seconds"]


def latency_metrics() -> dict[str, float]:
    names = [f"{name}_{part}" for name in LATENCIES for part in ("count", "sum")]
    return {name: metric(name) for name in names} | {
        "tokens": metric("pagedserve_generation_tokens_total"),
        "length": metric("pagedserve_requests_finished_total", finish_reason="length"),
        "stop": metric("pagedserve_requests_finished_total", finish_reason="stop")}


def test_latencies_are_measured_per_request_and_per_choice(monkeypatch):
    """Clock readings: 101 start, then one per delta with tokens, one at the request's end.
    TTFT is the request's first token (not each choice's); inter-token latency is per choice
    and per token of a delta; a delta without tokens is no token."""
    monkeypatch.setattr(generation, "time", FakeClock(100))
    length = common_pb2.FINISH_REASON_LENGTH
    scheduler = ScriptedScheduler([
        delta(0, "a"),                          # 102: first token, TTFT 1
        delta(1, "b"),                          # 103: choice 1's first token, no TTFT
        delta(0, "cd"),                         # 104: (104 - 102) / 2 tokens = 1 per token
        scheduler_pb2.TokenDelta(seq_index=1),  # no tokens, no reading
        delta(1, "e", length),                  # 105: 105 - 103 = 2
        delta(0, "f END")])                     # 106: 106 - 104 = 2; stop; e2e 107 - 101 = 6
    before = latency_metrics()
    choices, usage = collect(scheduler, common_pb2.SamplingParams(n=2, stop=["END"]))
    after = latency_metrics()
    assert usage.completion_tokens == 6 + len(ids(" END"))
    change = {name: after[name] - before[name] for name in after}
    assert change == pytest.approx({  # the sums are floats, added to by earlier tests
        "pagedserve_time_to_first_token_seconds_count": 1,
        "pagedserve_time_to_first_token_seconds_sum": 1,
        "pagedserve_inter_token_latency_seconds_count": 3,
        "pagedserve_inter_token_latency_seconds_sum": 1 + 2 + 2 / len(ids("f END")),
        "pagedserve_e2e_request_latency_seconds_count": 1,
        "pagedserve_e2e_request_latency_seconds_sum": 6,
        "tokens": usage.completion_tokens, "length": 1, "stop": 1})


class BeamModel:
    """A scheduler over a toy language model: each step's submit gets the top logprobs of a
    fixed float64 distribution over a few tokens (EOS among them), drawn from the sequence so
    far. Records each submit and its deadline."""

    VOCAB = ids("abcd") + [TOKENIZER.eos_token_id]

    def __init__(self, answer: bool = True):
        self.submits: list[tuple[scheduler_pb2.SubmitRequest, object]] = []
        self.answer = answer

    def position(self, tokens: list[int], width: int) -> common_pb2.PositionLogprobs:
        weights = {t: random.Random(f"{tokens}-{t}").random() + 0.05 for t in self.VOCAB}
        logprobs = {t: math.log(w / sum(weights.values())) for t, w in weights.items()}
        ranked = sorted(logprobs, key=logprobs.get, reverse=True)[:width]
        top = [common_pb2.TokenLogprob(token_id=t, logprob=logprobs[t], rank=r)
               for r, t in enumerate(ranked, 1)]
        return common_pb2.PositionLogprobs(chosen=top[0], top=top)

    async def generate(self, submit, deadline):
        self.submits.append((submit, deadline))
        tokens = list(submit.prompt_token_ids)
        position = self.position(tokens, submit.sampling.logprobs)
        yield scheduler_pb2.TokenDelta(
            seq_index=0, num_prompt_tokens=len(tokens), num_cached_prompt_tokens=len(tokens) - 1,
            token_ids=[position.chosen.token_id] if self.answer else [],
            logprobs=[position] if self.answer else [],
            finish_reason=common_pb2.FINISH_REASON_LENGTH)


@pytest.mark.parametrize("width, reasons", [(1, {"length"}), (3, {"stop", "length"})])
def test_beam_search_returns_the_searched_beams_as_choices(width, reasons):
    """The choices are `search`'s beams over the same model (search itself is checked against
    transformers in test_beam_search.py), best first, EOS-ended ones "stop" with the EOS not in
    the text; every step's beams are submitted with step_sampling, under their own request ids,
    with the request's priority, salt and deadline."""
    params = BeamSearchParams(beam_width=width, max_tokens=4)
    model, prompt, deadline = BeamModel(), ids("hi"), Deadline.after(30)

    async def step(sequences):
        return [model.position(tokens, 2 * width) for tokens in sequences]
    [expected] = asyncio.run(search(step, [prompt], params, [TOKENIZER.eos_token_id]))
    before = latency_metrics()
    usage = Usage()
    choices = asyncio.run(beam_choices(model, SERVED, "req-1", prompt, params, usage,
                                       deadline=deadline, priority=3, cache_salt="salt"))
    after = latency_metrics()
    assert [(c.index, c.token_ids, c.logprobs) for c in choices] == [
        (i, beam.output_tokens, []) for i, beam in enumerate(expected)]
    assert [(c.text, c.finish_reason) for c in choices] == [
        (TOKENIZER.decode(beam.output_tokens, skip_special_tokens=True),
         "stop" if beam.finished else "length") for beam in expected]
    assert {c.finish_reason for c in choices} == reasons  # 3 beams: one EOS-ended
    assert TOKENIZER.eos_token not in "".join(c.text for c in choices)
    assert usage.completion_tokens == sum(len(c.token_ids) for c in choices)
    submits = [submit for submit, _ in model.submits]
    assert {d for _, d in model.submits} == {deadline}
    assert len({s.request_id for s in submits}) == len(submits) > width
    assert all(s.request_id.startswith("req-1-") for s in submits)
    assert {(s.model, s.priority, s.cache_salt) for s in submits} == {("m", 3, "salt")}
    assert all(s.sampling == step_sampling(params) for s in submits)
    finished = after["length"] + after["stop"] - before["length"] - before["stop"]
    e2e = "pagedserve_e2e_request_latency_seconds_count"
    assert (finished, after[e2e] - before[e2e]) == (width, 1)


def test_beam_search_defaults_to_no_priority_salt_or_deadline():
    model = BeamModel()
    asyncio.run(beam_choices(model, SERVED, "req-1", ids("hi"),
                             BeamSearchParams(beam_width=1, max_tokens=1), Usage()))
    [(submit, deadline)] = model.submits
    assert (submit.priority, submit.cache_salt, deadline) == (0, "", NO_DEADLINE)


def test_beam_search_fails_when_the_scheduler_returns_no_token():
    with pytest.raises(GatewayError) as refused:
        asyncio.run(beam_choices(BeamModel(answer=False), SERVED, "req-1", ids("hi"),
                                 BeamSearchParams(beam_width=1, max_tokens=1), Usage()))
    error = refused.value
    assert (error.status, error.message, error.error_type) == (
        500, "beam search: the scheduler returned no token", "internal_error")
