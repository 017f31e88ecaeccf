"""Building an executor's model runner from its flags: device and dtype, tensor-parallel group,
weights, KV cache size; and describing what was built (`describe`). Shared by the executor
service, the offline API and the followers of a tensor-parallel group."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import structlog
import torch
from torch import nn

from pagedserve.executor.config import EngineConfig
from pagedserve.executor.decode_graphs import DecodeGraphs, capture_decode_graphs, eager_reason
from pagedserve.executor.draft_model import DraftModel
from pagedserve.executor.kv_cache import (
    GIB,
    KvCacheSizeError,
    allocate_kv_cache,
    blocks_in,
    bytes_per_block,
    check_capacity,
    profile_cuda_blocks,
)
from pagedserve.executor.model_files import (
    ModelDirectory,
    ModelLoadError,
    default_cache_dir,
    resolve_model,
)
from pagedserve.executor.models import (
    UnsupportedArchitectureError,
    check_tensor_parallel,
    load_model,
)
from pagedserve.executor.models.layers import (
    attention_window,
    bind_kernels,
    quantize_linears,
    weight_bytes,
)
from pagedserve.executor.models.rope import context_length
from pagedserve.executor.models.weights import WeightLoadError
from pagedserve.executor.parallel import SINGLE, TensorParallelError
from pagedserve.executor.plan_checks import RunnerLimits
from pagedserve.executor.runner import ModelRunner, RunnerMemory
from pagedserve.executor.speculative import (
    SpeculativeConfig,
    SpeculativeConfigError,
    parse_speculative_config,
)
from pagedserve.executor.structured_output import GrammarCompiler
from pagedserve.executor.tp_group import TensorParallelGroup, join_group, start_group
from pagedserve.kernels.attention import FP8_DTYPES
from pagedserve.kernels.dispatch import KernelBackendError, Kernels, select_kernels
from pagedserve.kernels.quantization import fp8_supported
from pagedserve.runtime.serving import StartupError
from pagedserve.v1 import common_pb2, executor_pb2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = structlog.get_logger(__name__)


def pick_device(name: str, rank: int = 0, tensor_parallel_size: int = 1) -> torch.device:
    """The device of tensor-parallel rank `rank` (cuda:rank on cuda)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StartupError("--device cuda: no CUDA device is available")
    if torch.cuda.device_count() < tensor_parallel_size:
        raise StartupError(f"--tensor-parallel-size {tensor_parallel_size} needs one GPU per "
                           f"rank; {torch.cuda.device_count()} visible")
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return device


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


def pick_kv_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: the model's dtype (auto), or fp8 (`fp8` is e4m3, as in vLLM)."""
    if name == "auto":
        return dtype
    return FP8_DTYPES["fp8_e4m3" if name == "fp8" else name]


def build_runner(config: EngineConfig, model_dir: ModelDirectory, rank: int = 0,
                 init_method: str | None = None,
                 follower_log_flags: Sequence[str] = ()) -> ModelRunner:
    """Load the weights, pick the kernels, size and allocate the KV cache. With
    --tensor-parallel-size N, rank 0 (the default) starts ranks 1 .. N-1, which call this with
    their rank and the group's `init_method` (tp_follower.py), logging as
    `follower_log_flags` say."""
    size = config.tensor_parallel_size
    if size < 1:
        raise StartupError(f"--tensor-parallel-size must be at least 1, got {size}")
    device = pick_device(config.device, rank, size)
    dtype = pick_dtype(config.dtype, device)
    try:
        kernels = select_kernels(config.attention_backend, device)
    except KernelBackendError as exc:
        raise StartupError(f"--attention-backend: {exc}") from None
    speculative = _speculative(config)  # before the slow load
    try:
        check_tensor_parallel(model_dir.path, size)
    except TensorParallelError as exc:
        raise StartupError(f"--tensor-parallel-size: {exc}") from None
    except (UnsupportedArchitectureError, OSError) as exc:
        raise StartupError(f"cannot load {model_dir.path}: {exc}") from None
    if rank == 0:
        # The followers load the model this rank resolved (a GGUF is converted only once).
        group = start_group(dataclasses.replace(config, model=str(model_dir.path)), device,
                            follower_log_flags)
    else:
        group = TensorParallelGroup(join_group(rank, size, init_method, device))
    try:
        return _build_rank(config, model_dir, device, dtype, kernels, group, speculative)
    except BaseException:
        group.close()
        raise


def _speculative(config: EngineConfig) -> SpeculativeConfig | None:
    if config.speculative_config is None:
        return None
    try:
        return parse_speculative_config(config.speculative_config)
    except SpeculativeConfigError as exc:
        raise StartupError(str(exc)) from None


def _require_fp8(device: torch.device, what: str, instead: str) -> None:
    """StartupError unless `device` multiplies fp8 in hardware."""
    if not fp8_supported(device):
        raise StartupError(f"{what} needs a CUDA GPU with fp8 tensor cores (compute capability "
                           f"8.9+: Ada, Hopper); {device} has none" + (f": {instead}"
                                                                        if instead else ""))


# --quantization values that name a quantized checkpoint's own method (as vLLM takes them):
# the checkpoint must be one, and it loads as it is.
CHECKPOINT_METHODS = ("gptq", "awq")


def _checkpoint_kind(quantization: str | None) -> str:
    return f"a quantized checkpoint ({quantization})" if quantization else "a float checkpoint"


def _build_rank(config: EngineConfig, model_dir: ModelDirectory, device: torch.device,
                dtype: torch.dtype, kernels: Kernels, group: TensorParallelGroup,
                speculative: SpeculativeConfig | None) -> ModelRunner:
    tp = group.tp
    if config.quantization == "fp8":  # before the slow load
        _require_fp8(device, "--quantization fp8", "use int8 or w8a8_int8")
    try:
        model = load_model(model_dir.path, dtype, tp)
    except (UnsupportedArchitectureError, WeightLoadError, OSError) as exc:
        raise StartupError(f"cannot load {model_dir.path}: {exc}") from None
    if model.quantization == "fp8":
        _require_fp8(device, f"{model_dir.path} is an fp8 checkpoint: it", "")
    if config.quantization in CHECKPOINT_METHODS:
        if model.quantization != config.quantization:
            raise StartupError(f"--quantization {config.quantization}: {model_dir.path} is "
                               f"{_checkpoint_kind(model.quantization)}: the flag names "
                               "the checkpoint's own method")
    elif config.quantization:
        if model.quantization:
            raise StartupError(f"--quantization {config.quantization}: {model_dir.path} is a "
                               f"quantized checkpoint already ({model.quantization}); the flag "
                               "quantizes float checkpoints")
        quantize_linears(model, config.quantization)
    # On the host, then moved: the device holds the weights only in the form the kernels pack
    # them in (a 4-bit checkpoint half a byte a value, not the byte each it loads as). Before
    # the CUDA profiling pass, so that it measures the kernels that will run.
    bind_kernels(model, kernels)
    model.to(device)
    context_len = context_length(model.config)
    max_model_len = config.max_model_len or context_len
    if max_model_len > context_len:
        raise StartupError(f"--max-model-len {max_model_len} exceeds the model's context "
                           f"length {context_len}")
    draft = None
    if speculative is not None and speculative.method == "draft_model" and tp.is_first:
        draft = _load_draft(config, speculative.model, model_dir, dtype, kernels, device,
                            max_model_len)
    kv_dtype = pick_kv_dtype(config.kv_cache_dtype, dtype)
    per_block = bytes_per_block(model, config.block_size, kv_dtype)
    draft_per_block = bytes_per_block(draft, config.block_size, kv_dtype) if draft else 0
    if device.type == "cuda":
        num_blocks = profile_cuda_blocks(model, config.block_size, kv_dtype, device,
                                         config.max_num_batched_tokens,
                                         config.gpu_memory_utilization, max_model_len,
                                         draft_per_block)
    else:
        num_blocks = blocks_in(config.kv_cache_gib * GIB, per_block + draft_per_block)
    try:
        # Block ids are shared by the ranks: the group holds what its smallest rank holds.
        num_blocks = check_capacity(tp.min_over_ranks(num_blocks), config.block_size,
                                    max_model_len)
    except KvCacheSizeError as exc:
        raise StartupError(str(exc)) from None
    allocate_kv_cache(model, num_blocks, config.block_size, kv_dtype, device)
    if draft is not None:
        # The draft's own pool, addressed by the same block ids (draft_model.py).
        allocate_kv_cache(draft, num_blocks, config.block_size, kv_dtype, device)
    memory = RunnerMemory(quantization=model.quantization or "",
                          weight_bytes=weight_bytes(model) + (weight_bytes(draft) if draft else 0),
                          kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
                          kv_bytes_per_block=per_block + draft_per_block)
    limits = RunnerLimits(num_blocks=num_blocks, block_size=config.block_size,
                          max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=config.max_num_batched_tokens,
                          max_model_len=max_model_len, max_logprobs=config.max_logprobs,
                          max_lookahead_tokens=speculative.num_speculative_tokens
                          if speculative else 0)
    graphs = _decode_graphs(config, model, kernels, device, tp.size, max_model_len)
    log.info("model ready", model=str(model_dir.path), device=str(device),
             dtype=str(dtype).removeprefix("torch."), **dataclasses.asdict(memory),
             kernels=kernels.name, kv_blocks=num_blocks,
             block_size=config.block_size, tensor_parallel_rank=tp.rank,
             tensor_parallel_size=tp.size)
    return ModelRunner(model, limits, model_dir.eos_token_ids(), device, group, memory,
                       speculative, draft and DraftModel(draft, config.block_size, device,
                                                         model.config.vocab_size),
                       _grammar_compiler(model_dir, model.config.vocab_size) if tp.is_first
                       else None, graphs)


def _decode_graphs(config: EngineConfig, model: nn.Module, kernels: Kernels,
                   device: torch.device, tensor_parallel_size: int,
                   max_model_len: int) -> DecodeGraphs | None:
    """The decode steps' CUDA graphs, captured now (counted in start-up), where they apply."""
    reason = eager_reason(device, kernels.name, tensor_parallel_size, config.enforce_eager)
    if reason is not None:
        log.info("decode steps run eagerly", reason=reason)
        return None
    return capture_decode_graphs(model, config.max_num_seqs, max_model_len, config.block_size,
                                 device)


def _grammar_compiler(model_dir: ModelDirectory, vocab_size: int) -> GrammarCompiler:
    """Structured output's compiler (rank 0 samples), its tokenizer built in its own thread
    from the model's (seconds: started now, not at the first request that needs it)."""
    def tokenizer():
        import llguidance.hf
        from transformers import AutoTokenizer

        return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(model_dir.path),
                                            n_vocab=vocab_size)
    return GrammarCompiler(tokenizer)


DRAFT_FLAG = "--speculative-config.model"


def _load_draft(config: EngineConfig, path: str, model_dir: ModelDirectory, dtype: torch.dtype,
                kernels: Kernels, device: torch.device, max_model_len: int) -> nn.Module:
    """The draft model of method draft_model, whole on this rank, in the model's dtype and
    kernels (a quantized checkpoint as its config says); refused, naming the key, when it
    cannot stand in for the model: another tokenizer, or a shorter context."""
    try:
        draft_dir = resolve_model(path, config.model_cache_dir or default_cache_dir(),
                                  gguf_dequantize=config.gguf_dequantize, flag=DRAFT_FLAG)
        draft = load_model(draft_dir.path, dtype, SINGLE)
    except (ModelLoadError, UnsupportedArchitectureError, WeightLoadError, OSError) as exc:
        raise StartupError(f"cannot load the draft model: {exc}") from None
    if context_length(draft.config) < max_model_len:
        raise StartupError(f"{DRAFT_FLAG} {path}: its context length "
                           f"{context_length(draft.config)} is shorter than --max-model-len "
                           f"{max_model_len}")
    vocabularies = _vocabulary(draft_dir), _vocabulary(model_dir)
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise StartupError(f"{DRAFT_FLAG} {path}: its tokenizer's vocabulary differs from "
                           f"{model_dir.path}'s: a draft proposes the model's token ids")
    bind_kernels(draft, kernels)  # on the host, then moved, as the model is
    draft.to(device)
    log.info("draft model ready", model=str(draft_dir.path), weight_bytes=weight_bytes(draft))
    return draft


def _vocabulary(model_dir: ModelDirectory) -> dict | None:
    """The token -> id map of the directory's tokenizer.json (None without one: then the
    vocabularies are not compared)."""
    data = model_dir.tokenizer_files().get("tokenizer.json")
    return json.loads(data)["model"].get("vocab") if data else None


def describe(executor_id: str, model_dir: ModelDirectory,
             runner: ModelRunner) -> executor_pb2.DescribeResponse:
    """What this executor is and holds, as it registers and answers Describe (and as the
    offline engine describes its in-process runner to its scheduler)."""
    limits, memory = runner.limits, runner.memory
    dtype = str(next(runner.model.parameters()).dtype).removeprefix("torch.")
    return executor_pb2.DescribeResponse(
        executor_id=executor_id,
        model=common_pb2.ModelInfo(
            model_id=model_dir.served_name, architecture=model_dir.architecture,
            max_model_len=limits.max_model_len, vocab_size=runner.model.config.vocab_size,
            eos_token_ids=model_dir.eos_token_ids(), dtype=dtype,
            quantization=memory.quantization, weight_bytes=memory.weight_bytes),
        kv_cache=common_pb2.KvCacheInfo(num_blocks=limits.num_blocks,
                                        block_size=limits.block_size,
                                        dtype=memory.kv_cache_dtype,
                                        bytes_per_block=memory.kv_bytes_per_block,
                                        sliding_window=attention_window(
                                            runner.model,
                                            *([runner.draft.model] if runner.draft else []))),
        limits=common_pb2.ExecutorLimits(
            max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_logprobs=limits.max_logprobs,
            num_speculative_tokens=limits.max_lookahead_tokens,
            speculative_disable_by_batch_size=(runner.speculative.disable_by_batch_size or 0)
            if runner.speculative else 0),
        parallel=common_pb2.ParallelLayout(tensor_parallel_size=runner.tp.size),
        tokenizer=common_pb2.TokenizerFiles(files=model_dir.tokenizer_files()))
