"""Sizing and allocating the paged KV cache (docs/design.md §5).

CPU: the pool is a configured number of GiB (`--kv-cache-gib`). CUDA: after the weights load,
a profiling forward pass at the full token budget measures peak activation memory; the pool gets
what is left of `--gpu-memory-utilization` of the device's memory. Either way the blocks are
counted in the cache's own dtype (`--kv-cache-dtype`: an fp8 cache holds twice the blocks of a
bfloat16 one in the same bytes).
"""

from __future__ import annotations

import structlog
import torch
from torch import nn

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
from pagedserve.executor.models.layers import bind_kv_caches, kv_cache_shape
from pagedserve.runtime.capacity import MAX_KV_BLOCKS

log = structlog.get_logger(__name__)

GIB = 1 << 30


class KvCacheSizeError(ValueError):
    pass


def bytes_per_block(model: nn.Module, block_size: int, kv_dtype: torch.dtype) -> int:
    """K and V of one block, summed over every attention layer."""
    itemsize = kv_dtype.itemsize
    return sum(2 * n * itemsize for n in
               (torch.Size(shape).numel() for shape in kv_cache_shape(model, 1, block_size)))


def blocks_in(budget_bytes: float, per_block: int) -> int:
    """How many whole blocks of `per_block` bytes a budget of `budget_bytes` holds."""
    return int(budget_bytes // per_block)


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int,
                      kv_dtype: torch.dtype, device: torch.device) -> None:
    """Zeroed caches (stale slots must hold finite values: attention masks scores, and
    0 * NaN would leak into the output), bound to the model's attention layers."""
    caches = [(torch.zeros(shape, dtype=kv_dtype, device=device),
               torch.zeros(shape, dtype=kv_dtype, device=device))
              for shape in kv_cache_shape(model, num_blocks, block_size)]
    bind_kv_caches(model, caches)


def check_capacity(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """`num_blocks`, at most MAX_KV_BLOCKS (the scheduler's ceiling), if they hold one sequence
    of max_model_len tokens; else a clear error."""
    if num_blocks > MAX_KV_BLOCKS:
        log.info("KV cache capped at the scheduler's most blocks", could_hold=num_blocks,
                 kv_blocks=MAX_KV_BLOCKS)
        num_blocks = MAX_KV_BLOCKS
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise KvCacheSizeError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens), fewer than one sequence of max_model_len "
            f"{max_model_len} needs ({needed} blocks): give it more memory or lower "
            "--max-model-len")
    return num_blocks


def profile_cuda_blocks(model: nn.Module, block_size: int, kv_dtype: torch.dtype,
                        device: torch.device, max_num_batched_tokens: int,
                        gpu_memory_utilization: float, max_model_len: int,
                        draft_bytes_per_block: int = 0) -> int:
    """Blocks that fit in the device memory left after weights (a draft model's included,
    loaded before) and peak activations, each block also holding `draft_bytes_per_block` of
    the draft's cache (not checked against max_model_len: see `check_capacity`)."""
    per_block = bytes_per_block(model, block_size, kv_dtype)
    # The full token budget as prompts of at most max_model_len tokens, over a throw-away
    # cache just large enough for them.
    lengths = [max_model_len] * (max_num_batched_tokens // max_model_len)
    if max_num_batched_tokens % max_model_len:
        lengths.append(max_num_batched_tokens % max_model_len)
    seqs, next_block = [], 0
    for length in lengths:
        num_blocks = -(-length // block_size)
        seqs.append(ScheduledSequence([0] * length, 0,
                                      list(range(next_block, next_block + num_blocks))))
        next_block += num_blocks
    profile_blocks = next_block
    allocate_kv_cache(model, profile_blocks, block_size, kv_dtype, device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    batch = build_flat_batch(seqs, block_size, device)
    with torch.inference_mode():
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        model.compute_logits(hidden[batch.last_token_rows])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - profile_blocks * per_block
    bind_kv_caches(model, [(None, None)] * len(kv_cache_shape(model, 1, block_size)))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    return max(0, blocks_in(total * gpu_memory_utilization - peak,
                            per_block + draft_bytes_per_block))
