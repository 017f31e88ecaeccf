"""One prompt through the scheduler, as the client sees it: token deltas become text deltas per
choice (incremental detokenization, stop strings), with the usage counts at the end. Shared by
the HTTP API and the public gRPC API. Also beam search over the scheduler (`beam_choices`, the
HTTP API's `use_beam_search`), each choice's text read for tool calls (`read_tool_calls`,
with pagedserve/gateway/tool_calls.py), and a prompt's embedding (`embed`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from pagedserve.gateway.detokenizer import IncrementalDetokenizer
from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.metrics import METRICS
from pagedserve.gateway.scheduler_client import NO_DEADLINE, Deadline, SchedulerClient, ServedModel
from pagedserve.gateway.tool_calls import CallReader, NamedCallReader, ToolCallDelta, ToolPlan
from pagedserve.runtime.beam_search import BeamSearchParams, search, step_sampling
from pagedserve.runtime.finish_reasons import openai_name
from pagedserve.runtime.pooling import embedding_sampling
from pagedserve.v1 import common_pb2, scheduler_pb2


@dataclass
class ChoiceDelta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.PositionLogprobs]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Calls read from the text (tool_calls.read_tool_calls), which then holds only content.
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)
    # The pooled prompt, when sampling.pooling was set.
    embedding: list[float] = field(default_factory=list)


async def generate(client: SchedulerClient, served: ServedModel, request_id: str,
                   prompt_token_ids: list[int], sampling: common_pb2.SamplingParams,
                   usage: Usage, priority: int = 0, deadline: Deadline = NO_DEADLINE,
                   cache_salt: str = "") -> AsyncIterator[ChoiceDelta]:
    """Choice deltas of one prompt; `usage` is filled in as the stream goes. Ends when every
    choice has finished; a stop string ends its choice at once (the scheduler is told to stop
    that sequence; the rest of the request is aborted when the last choice is done). Past
    `deadline` the scheduler aborts the request and this raises the 504 GatewayError."""
    n = max(1, sampling.n)
    skip_special = sampling.skip_special_tokens if sampling.HasField("skip_special_tokens") \
        else True
    detokenizers = [IncrementalDetokenizer(served.tokenizer, prompt_token_ids,
                                           skip_special_tokens=skip_special,
                                           stop=list(sampling.stop),
                                           include_stop_str_in_output=sampling
                                           .include_stop_str_in_output)
                    for _ in range(n)]
    finished = [False] * n
    started = _started(usage, prompt_token_ids)
    last_token_at: list[float | None] = [None] * n
    submit = scheduler_pb2.SubmitRequest(request_id=request_id, model=served.info.model_id,
                                         prompt_token_ids=prompt_token_ids, sampling=sampling,
                                         priority=priority, cache_salt=cache_salt)
    async for delta in client.generate(submit, deadline):
        if delta.num_prompt_tokens:
            usage.cached_tokens = delta.num_cached_prompt_tokens
            usage.prompt_logprobs = list(delta.prompt_logprobs)
            usage.embedding = list(delta.embedding)
        i = delta.seq_index
        if finished[i]:
            continue
        usage.completion_tokens += len(delta.token_ids)
        _observe_tokens(last_token_at, i, len(delta.token_ids), started)
        detokenizer = detokenizers[i]
        choice = ChoiceDelta(index=i, text=detokenizer.add(delta.token_ids),
                             token_ids=list(delta.token_ids), logprobs=list(delta.logprobs))
        if detokenizer.stopped:
            choice.finish_reason, choice.stop_reason = "stop", detokenizer.stop_reason
            # others go on: spare its steps (unless the scheduler finished it with this delta)
            if not delta.finish_reason and not all(finished[:i] + finished[i + 1:]):
                client.stop_sequence(request_id, i)
        elif delta.finish_reason:
            choice.text += detokenizer.finish()
            choice.finish_reason = openai_name(delta.finish_reason) or "stop"
            if delta.HasField("stop_token_id"):
                choice.stop_reason = delta.stop_token_id
        finished[i] = choice.finish_reason is not None
        if finished[i]:
            _observe_finished(choice.finish_reason, started, last=all(finished))
        yield choice
        if all(finished):
            return  # leaving cancels the scheduler call: nothing keeps running


async def read_tool_calls(deltas: AsyncIterator[ChoiceDelta], plan: ToolPlan
                          ) -> AsyncIterator[ChoiceDelta]:
    """Each choice's deltas with its text read for calls: content and `tool_calls` (the
    deltas' tokens and logprobs unchanged); a choice that called and stopped finishes with
    the plan's finish_reason."""
    if plan.new_reader is None:
        async for delta in deltas:
            yield delta
        return
    readers: dict[int, CallReader | NamedCallReader] = {}
    async for delta in deltas:
        reader = readers.setdefault(delta.index, plan.new_reader())
        content, calls = reader.feed(delta.text)
        finish_reason = delta.finish_reason
        if finish_reason is not None:
            rest, last = reader.finish()
            content, calls = content + rest, calls + last
            if reader.called and finish_reason == "stop":
                finish_reason = plan.finish_reason
        yield replace(delta, text=content, tool_calls=calls, finish_reason=finish_reason)


async def embed(client: SchedulerClient, served: ServedModel, request_id: str,
                prompt_token_ids: list[int], pooling: common_pb2.Pooling,
                deadline: Deadline = NO_DEADLINE, cache_salt: str = "") -> list[float]:
    """The prompt pooled as `pooling` says. The scheduler computes the prompt as for a
    generation of one token (chunked prefill, preemption and executor loss alike) and sends
    the vector with that token, which is dropped: leaving the call aborts the request."""
    _started(Usage(), prompt_token_ids)
    submit = scheduler_pb2.SubmitRequest(request_id=request_id, model=served.info.model_id,
                                         prompt_token_ids=prompt_token_ids,
                                         sampling=embedding_sampling(pooling),
                                         cache_salt=cache_salt)
    async for delta in client.generate(submit, deadline):
        if delta.embedding:
            return list(delta.embedding)
    raise GatewayError(500, "embeddings: the scheduler returned no vector", "internal_error")


def _started(usage: Usage, prompt_token_ids: list[int]) -> float:
    """A request's start: its prompt counted (usage and metrics); the monotonic time."""
    usage.prompt_tokens = len(prompt_token_ids)
    METRICS.prompt_tokens.inc(len(prompt_token_ids))
    return time.monotonic()


def _observe_finished(finish_reason: str, started: float, last: bool) -> None:
    """A choice finished; with the request's `last`, its end-to-end latency too."""
    METRICS.requests_finished.labels(finish_reason).inc()
    if last:
        METRICS.e2e_request_latency.observe(time.monotonic() - started)


def _observe_tokens(last_token_at: list[float | None], index: int, count: int,
                    started: float) -> None:
    if not count:
        return
    now = time.monotonic()
    METRICS.generation_tokens.inc(count)
    previous = last_token_at[index]
    if previous is None:
        if all(t is None for t in last_token_at):
            METRICS.time_to_first_token.observe(now - started)
    else:
        METRICS.inter_token_latency.observe((now - previous) / count)
    last_token_at[index] = now


async def beam_choices(client: SchedulerClient, served: ServedModel, request_id: str,
                       prompt_token_ids: list[int], params: BeamSearchParams, usage: Usage,
                       deadline: Deadline = NO_DEADLINE, priority: int = 0,
                       cache_salt: str = "") -> list[ChoiceDelta]:
    """The beam_width best beams of one prompt as finished choices, best first: the search of
    pagedserve/runtime/beam_search.py, each step's beams submitted to the scheduler together (it
    batches them, and its prefix cache shares their blocks)."""
    sampling = step_sampling(params)
    ids = itertools.count()
    started = _started(usage, prompt_token_ids)

    async def next_position(tokens: list[int]) -> common_pb2.PositionLogprobs:
        number = next(ids)
        submit = scheduler_pb2.SubmitRequest(
            request_id=f"{request_id}-{number}", model=served.info.model_id,
            prompt_token_ids=tokens, sampling=sampling, priority=priority,
            cache_salt=cache_salt)
        async for delta in client.generate(submit, deadline):
            if number == 0 and delta.num_prompt_tokens:  # the first step's: the prompt alone
                usage.cached_tokens = delta.num_cached_prompt_tokens
            if delta.logprobs:
                return delta.logprobs[0]
        raise GatewayError(500, "beam search: the scheduler returned no token",
                           "internal_error")

    async def step(sequences: list[list[int]]) -> list[common_pb2.PositionLogprobs]:
        return list(await asyncio.gather(*(next_position(tokens) for tokens in sequences)))

    [beams] = await search(step, [prompt_token_ids], params, served.info.eos_token_ids)
    usage.completion_tokens = sum(len(beam.output_tokens) for beam in beams)
    choices = [ChoiceDelta(index=i, token_ids=beam.output_tokens, logprobs=[],
                           text=served.tokenizer.decode(beam.output_tokens,
                                                        skip_special_tokens=True),
                           finish_reason="stop" if beam.finished else "length")
               for i, beam in enumerate(beams)]
    for choice in choices:
        _observe_finished(choice.finish_reason, started, last=choice is choices[-1])
    return choices
