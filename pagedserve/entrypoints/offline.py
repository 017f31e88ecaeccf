"""Offline batch inference: the scheduler and an executor in one process, without gRPC.

    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1.common_pb2 import SamplingParams

    llm = LLM()  # the embedded default model; LLM(model="path/to/hf-dir", dtype="bfloat16")
    # LLM(model=..., tensor_parallel_size=2): two processes; `with LLM(...) as llm:` or
    # llm.close() stops the second
    outputs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32, temperature=0))
    print(outputs[0].outputs[0].text)
    replies = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))
    best = llm.beam_search(["Hello"], BeamSearchParams(beam_width=4, max_tokens=8))

The scheduler drives the executor through `InProcessExecutorHandle`, which has the interface of
the gRPC handle (send plans in order, receive results in order), so both are tested by the same
scheduling tests. This module is the one place that imports both services (docs/design.md §1).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pagedserve.executor.bootstrap import build_runner, describe
from pagedserve.executor.config import EngineConfig
from pagedserve.executor.model_files import default_cache_dir, resolve_model
from pagedserve.executor.runner import ModelRunner
from pagedserve.runtime.beam_search import (
    BeamSearchOutput,
    BeamSearchParams,
    search,
    step_sampling,
)
from pagedserve.runtime.chat import chat_prompt_ids
from pagedserve.runtime.finish_reasons import openai_name
from pagedserve.runtime.pooling import embedding_sampling, pooling_from_config
from pagedserve.scheduler.admission import admit_request
from pagedserve.scheduler.executor_handle import ExecutorHandle
from pagedserve.scheduler.executor_pool import schedule_executor
from pagedserve.scheduler.pool_loop import Overlap, PoolLoop, failures_into
from pagedserve.v1 import common_pb2, executor_pb2, scheduler_pb2

# vLLM's default when a request names no max_tokens.
DEFAULT_MAX_TOKENS = 16


@dataclass
class ExecutedCounters:
    """Steps the in-process executor was sent (plans that compute something) and the sequences
    they computed, summed: their ratio is the mean batch size `pagedserve bench throughput`
    reports, which the scheduler's counters (plans, tokens) do not give."""
    steps: int = 0
    sequences: int = 0


class InProcessExecutorHandle:
    """Runs plans on a ModelRunner on the engine's step thread, in the order they are sent."""

    def __init__(self, runner: ModelRunner, step_thread: ThreadPoolExecutor,
                 counters: ExecutedCounters | None = None):
        self.runner = runner
        self.counters = ExecutedCounters() if counters is None else counters
        self._thread = step_thread
        self._pending: deque[asyncio.Future] = deque()

    async def send(self, plan: executor_pb2.StepPlan) -> None:
        loop = asyncio.get_running_loop()
        if plan.work:
            self.counters.steps += 1
            self.counters.sequences += len(plan.work)
        self._pending.append(loop.run_in_executor(self._thread, self.runner.step, plan))

    async def receive(self) -> executor_pb2.StepResult:
        return await self._pending.popleft()

    async def close(self) -> None:
        for future in self._pending:
            future.cancel()  # the steps not started yet
        # The thread runs its work in order: once this no-op has run, the step in progress
        # (if any) has ended, and the next handle starts from a quiet runner.
        await asyncio.wrap_future(self._thread.submit(lambda: None))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)
    # The pooled prompt, when sampling.pooling was set (what `LLM.embed` returns).
    embedding: list[float] = field(default_factory=list)


class LLM:
    """The engine in this process. `engine_options` are EngineConfig's fields, the executor's
    flags by their Python names (dtype="bfloat16", kv_cache_gib=8); an unknown one is a
    TypeError naming it."""

    def __init__(self, model: str | None = None, *, enable_prefix_caching: bool = True,
                 overlap: bool = True, **engine_options):
        config = EngineConfig.from_options(model=model, **engine_options)
        model_dir = resolve_model(config.model, config.model_cache_dir or default_cache_dir(),
                                  config.served_model_name, config.gguf_dequantize)
        # The model is built and every step runs on this one thread, for the engine's life:
        # torch's OpenMP team belongs to the calling thread (a thread per `generate` would start
        # a team each time), and the ranks of a tensor-parallel group are killed when the
        # thread that started them exits (PR_SET_PDEATHSIG is per thread).
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        try:
            runner = self._runner = self._step_thread.submit(build_runner, config,
                                                             model_dir).result()
        except BaseException:
            self._step_thread.shutdown()
            raise
        self.executed = ExecutedCounters()
        self._attach(model_dir.path, describe("offline", model_dir, runner),
                     self._in_process_handle, enable_prefix_caching, overlap)

    def _in_process_handle(self) -> InProcessExecutorHandle:
        if self._runner is None:
            raise RuntimeError("this LLM is closed")
        return InProcessExecutorHandle(self._runner, self._step_thread, self.executed)

    def _attach(self, tokenizer_dir, executor: executor_pb2.DescribeResponse,
                make_handle: Callable[[], ExecutorHandle], enable_prefix_caching: bool,
                overlap: bool) -> None:
        """Set up the scheduler side for an executor described by `executor`, reached through
        the handles `make_handle` opens (in-process here; tests also plug in gRPC)."""
        self.scheduler, self.pool_limits = schedule_executor(executor, enable_prefix_caching)
        self.blocks = self.scheduler.blocks
        self.eos_token_ids = list(executor.model.eos_token_ids)
        self.max_logprobs = executor.limits.max_logprobs
        self.tokenizer_dir = tokenizer_dir
        self.make_handle = make_handle
        self.overlap = overlap
        self._tokenizer = None
        self._ids = itertools.count()

    def close(self) -> None:
        """Stops the engine's step thread and the tensor-parallel ranks it started (with
        tensor_parallel_size > 1; they also stop when this process exits). The engine cannot
        generate afterwards."""
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()
            self._runner = None
            self._step_thread.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 sampling_params: common_pb2.SamplingParams
                 | Sequence[common_pb2.SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) and return the outputs in order."""
        token_prompts = self._token_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, common_pb2.SamplingParams):
            sampling_params = [sampling_params] * len(token_prompts)
        if len(sampling_params) != len(token_prompts):
            raise ValueError(f"sampling_params: {len(sampling_params)} for "
                             f"{len(token_prompts)} prompts")
        params = [self._with_defaults(p) for p in sampling_params]
        return asyncio.run(self._generate(token_prompts, params))

    def embed(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
              pooler_config: dict | None = None) -> list[list[float]]:
        """Each prompt's embedding, as vLLM's `LLM.embed`: its final hidden states pooled as
        `pooler_config` says (vLLM's {"pooling_type": "LAST" or "MEAN", "normalize": bool};
        None: LAST, normalized; docs/embeddings.md)."""
        sampling = embedding_sampling(pooling_from_config(pooler_config))
        return [output.embedding for output in self.generate(prompts, sampling)]

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: common_pb2.SamplingParams
             | Sequence[common_pb2.SamplingParams] | None = None, *,
             add_generation_prompt: bool = True,
             tools: Sequence[dict] | None = None) -> list[RequestOutput]:
        """A reply to each conversation (a list of {"role": ..., "content": ...} messages, or a
        list of such lists), its prompt rendered with the model's chat template, as vLLM's
        `LLM.chat`; `tools` (OpenAI's shape) are rendered too, and the replies are the model's
        text, calls unread (as vLLM's). The rendered text is tokenized without adding special
        tokens: the template wrote them (runtime/chat.py, as the gateway does)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [chat_prompt_ids(self.tokenizer, conversation, add_generation_prompt, tools)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params)

    def beam_search(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """The `params.beam_width` best continuations of each prompt, best first, as vLLM's
        `LLM.beam_search` (runtime/beam_search.py: beams share KV blocks through the prefix
        cache). One event loop runs every step."""
        params.check(self.max_logprobs)
        sampling = step_sampling(params)

        async def step(sequences: list[list[int]]) -> list[common_pb2.PositionLogprobs]:
            outputs = await self._generate(sequences, [sampling] * len(sequences))
            return [output.outputs[0].logprobs[0] for output in outputs]

        results = asyncio.run(search(step, self._token_prompts(prompts), params,
                                     self.eos_token_ids))
        for beams in results:
            for beam in beams:
                beam.text = self.tokenizer.decode(beam.output_tokens, skip_special_tokens=True)
        return [BeamSearchOutput(beams) for beams in results]

    def _token_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        return [self.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompts]

    @staticmethod
    def _with_defaults(params: common_pb2.SamplingParams | None) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams() if params is None else params
        if not params.HasField("max_tokens"):
            params = common_pb2.SamplingParams.FromString(params.SerializeToString())
            params.max_tokens = DEFAULT_MAX_TOKENS
        return params

    async def _generate(self, prompts: list[list[int]],
                        params: list[common_pb2.SamplingParams]) -> list[RequestOutput]:
        handle = self.make_handle()
        lost: list[str] = []
        failed = asyncio.Event()
        loop = PoolLoop(self.scheduler, handle, Overlap.ALWAYS if self.overlap else Overlap.NEVER,
                        failures_into(lost, failed))
        collectors = []
        for prompt, sampling in zip(prompts, params, strict=True):
            collector = _Collector(f"offline-{next(self._ids)}", prompt, max(1, sampling.n))
            request = admit_request(collector.request_id, prompt, sampling, 0, self.pool_limits,
                                    collector.on_delta)
            self.scheduler.add(request)
            collectors.append(collector)
        task = asyncio.create_task(loop.run())
        loop.notify()
        try:
            for collector in collectors:
                await asyncio.wait({asyncio.ensure_future(collector.done.wait()), task,
                                    asyncio.ensure_future(failed.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                if lost:
                    raise RuntimeError(f"the in-process executor failed: {lost[0]}")
        finally:
            task.cancel()
            await handle.close()
        return [collector.output(self.tokenizer) for collector in collectors]


class _Collector:
    """Gathers one request's token deltas."""

    def __init__(self, request_id: str, prompt: list[int], n: int):
        self.request_id, self.prompt = request_id, prompt
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.finish: list[int] = [0] * n
        self.cached = 0
        self.prompt_logprobs: list = []
        self.embedding: list[float] = []
        self.done = asyncio.Event()

    def on_delta(self, delta: scheduler_pb2.TokenDelta) -> None:
        if delta.num_prompt_tokens:
            self.cached = delta.num_cached_prompt_tokens
            self.prompt_logprobs = list(delta.prompt_logprobs)
            self.embedding = list(delta.embedding)
        self.tokens[delta.seq_index] += delta.token_ids
        self.logprobs[delta.seq_index] += delta.logprobs
        if delta.finish_reason:
            self.finish[delta.seq_index] = delta.finish_reason
        if all(self.finish):
            self.done.set()

    def output(self, tokenizer) -> RequestOutput:
        outputs = [CompletionOutput(index=i, text=tokenizer.decode(t, skip_special_tokens=True),
                                    token_ids=t, finish_reason=openai_name(f),
                                    logprobs=lp)
                   for i, (t, f, lp) in enumerate(zip(self.tokens, self.finish, self.logprobs,
                                                      strict=True))]
        return RequestOutput(request_id=self.request_id, prompt_token_ids=self.prompt,
                             outputs=outputs, num_cached_tokens=self.cached,
                             prompt_logprobs=self.prompt_logprobs, embedding=self.embedding)
