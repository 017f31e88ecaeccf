"""Building an executor's model runner from its flags: device and dtype, weights, KV cache
size. Shared by the executor service and the offline API."""

from __future__ import annotations

import argparse
import pathlib

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
from executor_svc.model_files import ModelDirectory
from executor_svc.models import UnsupportedArchitectureError, load_model
from executor_svc.models.layers import bind_kernels
from executor_svc.models.weights import WeightLoadError
from executor_svc.runner import ModelRunner, RunnerLimits
from kernels.dispatch import KernelBackendError, select_kernels
from pagedserve.serving import StartupError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = structlog.get_logger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda: no CUDA device is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bfloat16
    weights halve the memory traffic and oneDNN's bf16 matmuls run about 2.5x float32's."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" or cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise StartupError("--dtype float16 is not supported on cpu (use float32 or bfloat16)")
    return DTYPES[name]


def build_runner(args: argparse.Namespace, model_dir: ModelDirectory) -> ModelRunner:
    """Load the weights, pick the kernels, size and allocate the KV cache."""
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        kernels = select_kernels(args.attention_backend, device)
    except KernelBackendError as exc:
        raise StartupError(f"--attention-backend: {exc}") from None
    try:
        model = load_model(model_dir.path, dtype).to(device)
    except (UnsupportedArchitectureError, WeightLoadError, OSError) as exc:
        raise StartupError(f"cannot load {model_dir.path}: {exc}") from None
    # Before the CUDA profiling pass, so that it measures the kernels that will run.
    bind_kernels(model, kernels)
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
             dtype=str(dtype).removeprefix("torch."), kernels=kernels.name, kv_blocks=num_blocks,
             block_size=args.block_size)
    return ModelRunner(model, limits, model_dir.eos_token_ids(), device)
