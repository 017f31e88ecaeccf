"""What the scheduler builds for one executor from the executor's own description (its
registration, or its `Describe` answer in the offline engine): a step scheduler over a block
pool of the executor's size, and the limits admission checks requests against. One function,
so the scheduler service and the offline engine size their pools the same way.

A registration comes from another process, so every number the scheduler sizes structures by
is checked against a ceiling first (`check_description`): a block pool is a Python object per
block, built on the scheduler's event loop, and 2^32 of them would stall it, then exhaust its
memory."""

from __future__ import annotations

import re

from pagedserve.runtime.capacity import MAX_KV_BLOCKS
from pagedserve.scheduler.admission import PoolLimits
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.step_scheduler import StepLimits, StepScheduler
from pagedserve.v1 import executor_pb2, scheduler_pb2

# Ceilings far above any real executor (the block count's: runtime/capacity.py).
MAX_BLOCK_SIZE = 1024
MAX_MODEL_LEN = 1 << 24
MAX_VOCAB_SIZE = 1 << 24
MAX_NUM_SEQS = 1 << 16
MAX_NUM_BATCHED_TOKENS = 1 << 24
MAX_EOS_TOKEN_IDS = 64
MAX_MODEL_ID_CHARS = 256
MAX_EXECUTOR_ID_CHARS = 128
MAX_ADDRESS_CHARS = 256
MAX_LABEL_CHARS = 32
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB
MAX_BLOCK_BYTES = 1 << 30  # 1 GiB per block (MAX_KV_BLOCKS of them stay below 2^64)
MAX_SPECULATIVE_TOKENS = 64
SESSION_TOKEN_CHARS = (32, 128)
# An executor id or address is a plain printable token: it lands in logs, metrics labels and
# the scheduler's dial target.
_PLAIN = re.compile(r"[A-Za-z0-9._:\[\]-]+")


class DescriptionError(ValueError):
    """An executor described itself with a value out of range; the message names the field."""


def check_description(description: scheduler_pb2.RegisterExecutorRequest
                      | executor_pb2.DescribeResponse) -> None:
    """Raises DescriptionError naming the first field out of its range."""
    kv, limits, model = description.kv_cache, description.limits, description.model
    ranges = [("kv_cache.num_blocks", kv.num_blocks, 1, MAX_KV_BLOCKS),
              ("kv_cache.block_size", kv.block_size, 1, MAX_BLOCK_SIZE),
              ("model.max_model_len", model.max_model_len, 1, MAX_MODEL_LEN),
              ("model.vocab_size", model.vocab_size, 1, MAX_VOCAB_SIZE),
              ("limits.max_num_seqs", limits.max_num_seqs, 1, MAX_NUM_SEQS),
              ("limits.max_num_batched_tokens", limits.max_num_batched_tokens, 1,
               MAX_NUM_BATCHED_TOKENS),
              ("limits.max_logprobs", limits.max_logprobs, 0, model.vocab_size),
              ("limits.num_speculative_tokens", limits.num_speculative_tokens, 0,
               MAX_SPECULATIVE_TOKENS),
              ("limits.speculative_disable_by_batch_size",
               limits.speculative_disable_by_batch_size, 0, MAX_NUM_SEQS),
              ("model.eos_token_ids (count)", len(model.eos_token_ids), 0, MAX_EOS_TOKEN_IDS),
              ("model.model_id (characters)", len(model.model_id), 0, MAX_MODEL_ID_CHARS),
              # Reported in /metrics: bounded so that total_blocks x bytes_per_block (the
              # pool's bytes in the stats) stays within uint64.
              ("model.weight_bytes", model.weight_bytes, 0, MAX_MEMORY_BYTES),
              ("kv_cache.bytes_per_block", kv.bytes_per_block, 0, MAX_BLOCK_BYTES),
              # A window past the model's length releases nothing; 0: no window.
              ("kv_cache.sliding_window", kv.sliding_window, 0, MAX_MODEL_LEN)]
    for field, value, low, high in ranges:
        if not low <= value <= high:
            raise DescriptionError(f"{field} is {value}, outside [{low}, {high}]")
    # Reported as they are in logs and /metrics labels: short plain tokens, as the executor
    # writes them ("int8", "float8_e4m3fn"), or empty.
    for field, value in (("model.quantization", model.quantization),
                         ("kv_cache.dtype", kv.dtype), ("model.dtype", model.dtype)):
        if value and not (len(value) <= MAX_LABEL_CHARS and _PLAIN.fullmatch(value)):
            raise DescriptionError(f"{field} must be at most {MAX_LABEL_CHARS} letters, digits "
                                   "or ._:-")
    outside = [i for i in model.eos_token_ids if i >= model.vocab_size]
    if outside:
        raise DescriptionError(f"model.eos_token_ids {outside} are not below model.vocab_size "
                               f"{model.vocab_size}")


def check_registration(registration: scheduler_pb2.RegisterExecutorRequest) -> None:
    """What a registration adds to a description: who it is, where to dial it and the session
    that holds its lease. Raises DescriptionError naming the field."""
    executor_id, address = registration.executor_id, registration.address
    if not (0 < len(executor_id) <= MAX_EXECUTOR_ID_CHARS and _PLAIN.fullmatch(executor_id)):
        raise DescriptionError(f"executor_id must be 1 to {MAX_EXECUTOR_ID_CHARS} letters, "
                               "digits or ._:-")
    host, _, port = address.rpartition(":")
    if not (len(address) <= MAX_ADDRESS_CHARS and host and _PLAIN.fullmatch(host)
            and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise DescriptionError(f"address must be host:port (at most {MAX_ADDRESS_CHARS} "
                               f"characters), got {address[:64]!r}")
    low, high = SESSION_TOKEN_CHARS
    if not low <= len(registration.session_token) <= high:
        raise DescriptionError(f"session_token must have {low} to {high} characters (the "
                               "executor makes a random one per process)")


def schedule_executor(description: scheduler_pb2.RegisterExecutorRequest
                      | executor_pb2.DescribeResponse,
                      enable_prefix_caching: bool) -> tuple[StepScheduler, PoolLimits]:
    """The step scheduler and admission limits for the executor `description` describes.
    Its prefix cache keys blocks by the served model too (docs/design.md §3), so two models'
    identical prompts never share a block. Raises DescriptionError for a value out of range."""
    check_description(description)
    kv, limits, model = description.kv_cache, description.limits, description.model
    blocks = BlockManager(kv.num_blocks, kv.block_size, enable_prefix_caching,
                          extra_key=model.model_id.encode(),
                          sliding_window=kv.sliding_window or None)
    scheduler = StepScheduler(
        blocks, StepLimits(limits.max_num_seqs, limits.max_num_batched_tokens,
                           model.max_model_len, limits.num_speculative_tokens,
                           limits.speculative_disable_by_batch_size),
        model.eos_token_ids)
    pool_limits = PoolLimits(max_model_len=model.max_model_len, num_blocks=kv.num_blocks,
                             block_size=kv.block_size, max_num_seqs=limits.max_num_seqs,
                             vocab_size=model.vocab_size, max_logprobs=limits.max_logprobs)
    return scheduler, pool_limits
