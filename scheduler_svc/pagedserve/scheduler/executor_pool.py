"""What the scheduler builds for one executor from the executor's own description (its
registration, or its `Describe` answer in the offline engine): a step scheduler over a block
pool of the executor's size, and the limits admission checks requests against. One function,
so the scheduler service and the offline engine size their pools the same way."""

from __future__ import annotations

from pagedserve.scheduler.admission import PoolLimits
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.step_scheduler import StepLimits, StepScheduler
from pagedserve.v1 import executor_pb2, scheduler_pb2


def schedule_executor(description: scheduler_pb2.RegisterExecutorRequest
                      | executor_pb2.DescribeResponse,
                      enable_prefix_caching: bool) -> tuple[StepScheduler, PoolLimits]:
    """The step scheduler and admission limits for the executor `description` describes.
    Its prefix cache keys blocks by the served model too (docs/design.md §3), so two models'
    identical prompts never share a block."""
    kv, limits, model = description.kv_cache, description.limits, description.model
    blocks = BlockManager(kv.num_blocks, kv.block_size, enable_prefix_caching,
                          extra_key=model.model_id.encode())
    scheduler = StepScheduler(
        blocks, StepLimits(limits.max_num_seqs, limits.max_num_batched_tokens,
                           model.max_model_len),
        model.eos_token_ids)
    pool_limits = PoolLimits(max_model_len=model.max_model_len, num_blocks=kv.num_blocks,
                             block_size=kv.block_size, max_num_seqs=limits.max_num_seqs,
                             vocab_size=model.vocab_size)
    return scheduler, pool_limits
