"""Entry point of `pagedserve executor`: loads the model, sizes and allocates the KV cache,
serves the Executor service (one long-lived Run stream of step plans, Describe, health) and
keeps itself registered with the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog
import torch

from executor_svc.kv_cache import (
    GIB,
    KvCacheSizeError,
    allocate_kv_cache,
    blocks_for_bytes,
    bytes_per_block,
    profile_cuda_blocks,
)
from executor_svc.model_files import (
    ModelDirectory,
    ModelLoadError,
    default_cache_dir,
    resolve_model,
)
from executor_svc.models import UnsupportedArchitectureError, load_model
from executor_svc.models.weights import WeightLoadError
from executor_svc.registration import keep_registered
from executor_svc.runner import ModelRunner, PlanError, RunnerLimits
from pagedserve.log import configure_logging
from pagedserve.serving import GrpcServer, StartupError, run_service, wait_for_stop_signal
from pagedserve.v1 import common_pb2, executor_pb2, executor_pb2_grpc, scheduler_pb2

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = structlog.get_logger(__name__)


class ExecutorService(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, runner: ModelRunner, description: executor_pb2.DescribeResponse):
        self.runner = runner
        self.description = description
        # One Run stream at a time; a new one stops the previous one (see executor.proto).
        self._stream_lock = asyncio.Lock()
        self._stop_current: asyncio.Event | None = None

    async def Describe(self, request, context) -> executor_pb2.DescribeResponse:
        return self.description

    async def Run(self, plans: AsyncIterator[executor_pb2.StepPlan],
                  context: grpc.aio.ServicerContext) -> AsyncIterator[executor_pb2.StepResult]:
        if self._stop_current is not None:
            self._stop_current.set()
        stop = self._stop_current = asyncio.Event()
        async with self._stream_lock:
            self.runner.reset()
            log.info("scheduler stream opened", peer=context.peer())
            plan_iter = aiter(plans)
            while (plan := await _next_or_stop(plan_iter, stop)) is not None:
                yield await self._execute(plan)
            if stop.is_set():
                await context.abort(grpc.StatusCode.ABORTED,
                                    "superseded by a newer Run stream")
            log.info("scheduler stream closed")

    async def _execute(self, plan: executor_pb2.StepPlan) -> executor_pb2.StepResult:
        try:
            # In a thread: the event loop keeps answering health checks and heartbeats.
            return await asyncio.to_thread(self.runner.execute, plan)
        except PlanError as exc:
            log.warning("malformed step plan", step_id=plan.step_id, error=str(exc))
            return executor_pb2.StepResult(step_id=plan.step_id, error=str(exc))


async def _next_or_stop(plans: AsyncIterator, stop: asyncio.Event):
    """The next plan; None when the stream ends or `stop` is set first."""
    next_plan = asyncio.ensure_future(anext(plans))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({next_plan, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        next_plan.cancel()
        return None
    try:
        return next_plan.result()
    except StopAsyncIteration:
        return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda: no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type == "cpu":
        raise StartupError("--dtype float16 is not supported on cpu (use float32 or bfloat16)")
    return DTYPES[name]


def _build_runner(args: argparse.Namespace, model_dir: ModelDirectory) -> ModelRunner:
    """Load the weights, size and allocate the KV cache."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        model = load_model(model_dir.path, dtype).to(device)
    except (UnsupportedArchitectureError, WeightLoadError, OSError) as exc:
        raise StartupError(f"cannot load {model_dir.path}: {exc}") from None
    context_len = int(model_dir.config.get("max_position_embeddings", 0)) or 2048
    max_model_len = args.max_model_len or context_len
    if max_model_len > context_len:
        raise StartupError(f"--max-model-len {max_model_len} exceeds the model's context "
                           f"length {context_len}")
    try:
        if device.type == "cuda":
            num_blocks = profile_cuda_blocks(model, args.block_size, dtype, device,
                                             args.max_num_batched_tokens,
                                             args.gpu_memory_utilization, max_model_len)
        else:
            num_blocks = blocks_for_bytes(args.kv_cache_gib * GIB,
                                          bytes_per_block(model, args.block_size, dtype),
                                          args.block_size, max_model_len)
    except KvCacheSizeError as exc:
        raise StartupError(str(exc)) from None
    allocate_kv_cache(model, num_blocks, args.block_size, dtype, device)
    limits = RunnerLimits(num_blocks=num_blocks, block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=max_model_len, max_logprobs=args.max_logprobs)
    log.info("model ready", model=str(model_dir.path), device=str(device),
             dtype=str(dtype).removeprefix("torch."), kv_blocks=num_blocks,
             block_size=args.block_size)
    return ModelRunner(model, limits, model_dir.eos_token_ids(), device)


def describe(executor_id: str, model_dir: ModelDirectory, runner: ModelRunner,
             dtype: str) -> executor_pb2.DescribeResponse:
    limits = runner.limits
    return executor_pb2.DescribeResponse(
        executor_id=executor_id,
        model=common_pb2.ModelInfo(
            model_id=model_dir.served_name, architecture=model_dir.architecture,
            max_model_len=limits.max_model_len, vocab_size=runner.model.config.vocab_size,
            eos_token_ids=model_dir.eos_token_ids(), dtype=dtype),
        kv_cache=common_pb2.KvCacheInfo(num_blocks=limits.num_blocks,
                                        block_size=limits.block_size),
        limits=common_pb2.ExecutorLimits(max_num_seqs=limits.max_num_seqs,
                                         max_num_batched_tokens=limits.max_num_batched_tokens,
                                         max_logprobs=limits.max_logprobs),
        parallel=common_pb2.ParallelLayout(tensor_parallel_size=1),
        tokenizer=common_pb2.TokenizerFiles(files=model_dir.tokenizer_files()))


async def serve(args: argparse.Namespace) -> None:
    cache_dir = args.model_cache_dir or default_cache_dir()
    try:
        # In threads: converting a GGUF on first start and loading weights take seconds.
        model_dir = await asyncio.to_thread(resolve_model, args.model, cache_dir,
                                            args.served_model_name)
    except ModelLoadError as exc:
        raise StartupError(str(exc)) from None
    runner = await asyncio.to_thread(_build_runner, args, model_dir)
    dtype = str(next(runner.model.parameters()).dtype).removeprefix("torch.")
    description = describe(f"executor-{uuid.uuid4().hex[:12]}", model_dir, runner, dtype)

    server = GrpcServer(f"{args.host}:{args.port}")
    executor_pb2_grpc.add_ExecutorServicer_to_server(ExecutorService(runner, description),
                                                     server.server)
    await server.start([SERVICE_NAME])
    stop = asyncio.Event()
    registration = None
    if args.scheduler_address:
        registration = asyncio.create_task(keep_registered(
            args.scheduler_address,
            scheduler_pb2.RegisterExecutorRequest(
                executor_id=description.executor_id,
                address=args.advertise_address or f"{args.host}:{args.port}",
                model=description.model, kv_cache=description.kv_cache,
                limits=description.limits, parallel=description.parallel),
            stop))
    await wait_for_stop_signal()
    stop.set()
    if registration is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await registration
    await server.stop()


def main(args: argparse.Namespace) -> int:
    configure_logging("executor", args.log_level, args.log_format)
    return run_service("executor", lambda: serve(args))
