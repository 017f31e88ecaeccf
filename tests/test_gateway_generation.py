"""gateway/pagedserve/gateway/generation.py over a scripted scheduler stream: when a stop string
ends one choice of an n > 1 request, the scheduler is told to stop that sequence (and only that one)
while the other choices go on; when the last choice stops, or the scheduler finished that sequence
with the same delta, nothing is sent (leaving the stream aborts the whole request). Beam search
(`beam_choices`) counts its request in the gateway's metrics and usage as `generate` does."""

import asyncio

from pagedserve.gateway.generation import Usage, beam_choices, generate
from pagedserve.gateway.metrics import METRICS
from pagedserve.gateway.scheduler_client import ServedModel
from pagedserve.runtime.beam_search import BeamSearchParams
from pagedserve.testing.tiny_models import byte_level_tokenizer
from pagedserve.v1 import common_pb2, scheduler_pb2

TOKENIZER = byte_level_tokenizer()


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False).input_ids


class ScriptedScheduler:
    """Streams the given deltas; records the sequences the gateway stops."""

    def __init__(self, deltas: list[scheduler_pb2.TokenDelta]):
        self.deltas = deltas
        self.stopped: list[tuple[str, int]] = []

    async def generate(self, submit, deadline):
        for delta in self.deltas:
            yield delta

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
