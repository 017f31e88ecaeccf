"""Beam search, built on the engine as vLLM builds its own: each step submits every live beam
as a request for one token with the top 2 x beam_width logprobs, and keeps the beam_width best
extensions by cumulative logprob. The beams share their KV memory through the prefix cache: a
beam's prompt + tokens so far is a prefix of what the step before computed, so each step
computes only the blocks that changed (the last partial block and the new token), whatever the
beam width. `search` is the algorithm over any way of running a step: the offline engine
(`LLM.beam_search`, entrypoints/offline.py) and the gateway (`use_beam_search`,
gateway/pagedserve/gateway/generation.py).

Scores follow vLLM's `get_beam_search_score`: cumulative logprob / length ** length_penalty,
the length counting prompt and generated tokens without a final EOS. A beam that samples EOS
(unless ignore_eos) is complete and leaves the search.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pagedserve.v1 import common_pb2


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def check(self, max_logprobs: int) -> None:
        if self.beam_width < 1 or 2 * self.beam_width > max_logprobs:
            raise ValueError(f"beam_width: {self.beam_width}, must be 1 to {max_logprobs // 2} "
                             f"(each step asks for twice as many top logprobs; max_logprobs is "
                             f"{max_logprobs})")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens}, must be at least 1")


@dataclass
class BeamSequence:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    num_prompt_tokens: int = 0
    finished: bool = False
    text: str = ""
    logprobs: list[float] = field(default_factory=list)  # of each generated token

    @property
    def output_tokens(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first."""

    sequences: list[BeamSequence]


def score(beam: BeamSequence, eos_token_ids: Sequence[int], length_penalty: float) -> float:
    length = len(beam.tokens) - (1 if beam.finished and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (length ** length_penalty)


# One step: for each sequence (token ids), the top logprobs of the position after it.
Step = Callable[[list[list[int]]], Awaitable[list[common_pb2.PositionLogprobs]]]


def step_sampling(params: BeamSearchParams) -> common_pb2.SamplingParams:
    """What each beam is submitted with at each step."""
    return common_pb2.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                     logprobs=2 * params.beam_width)


async def search(step: Step, prompts: Sequence[Sequence[int]], params: BeamSearchParams,
                 eos_token_ids: Sequence[int]) -> list[list[BeamSequence]]:
    """The `params.beam_width` best beams of each prompt, best first."""
    eos = set(eos_token_ids)
    live = [[BeamSequence(list(p), num_prompt_tokens=len(p))] for p in prompts]
    done: list[list[BeamSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        positions = await step([beam.tokens for beam in beams])
        start = 0
        for i, group in enumerate(live):
            # (cumulative logprob, beam, token): only the kept ones become sequences
            candidates = [(beam.cum_logprob + top.logprob, beam, top)
                          for beam, position in zip(group, positions[start:start + len(group)],
                                                    strict=True)
                          for top in position.top]
            start += len(group)
            candidates.sort(key=lambda c: c[0], reverse=True)
            kept = [_extension(beam, cum_logprob, top, eos, params)
                    for cum_logprob, beam, top in candidates[:params.beam_width]]
            done[i] += [c for c in kept if c.finished]
            live[i] = [c for c in kept if not c.finished]
    return [sorted(finished + unfinished, reverse=True,
                   key=lambda b: score(b, eos, params.length_penalty))[:params.beam_width]
            for finished, unfinished in zip(done, live, strict=True)]


def _extension(beam: BeamSequence, cum_logprob: float, top: common_pb2.TokenLogprob,
               eos: set[int], params: BeamSearchParams) -> BeamSequence:
    return BeamSequence(beam.tokens + [top.token_id], cum_logprob, beam.num_prompt_tokens,
                        finished=top.token_id in eos and not params.ignore_eos,
                        logprobs=beam.logprobs + [top.logprob])
