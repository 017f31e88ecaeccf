"""The registration an executor would send for an offline `LLM`'s engine, so that tests can put
such engines (their in-process executors) behind a real scheduler `Cluster`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.v1 import common_pb2, scheduler_pb2

if TYPE_CHECKING:
    from pagedserve.entrypoints.offline import LLM


def registration(executor_id: str, llm: LLM) -> scheduler_pb2.RegisterExecutorRequest:
    limits = llm.pool_limits
    return scheduler_pb2.RegisterExecutorRequest(
        executor_id=executor_id, address=f"{executor_id}:1", session_token="s" * 32,
        model=common_pb2.ModelInfo(model_id="tiny", max_model_len=limits.max_model_len,
                                   vocab_size=limits.vocab_size,
                                   eos_token_ids=llm.eos_token_ids),
        kv_cache=common_pb2.KvCacheInfo(num_blocks=limits.num_blocks,
                                        block_size=limits.block_size),
        limits=common_pb2.ExecutorLimits(
            max_num_seqs=limits.max_num_seqs, max_logprobs=limits.max_logprobs,
            max_num_batched_tokens=llm.scheduler.limits.max_num_batched_tokens,
            num_speculative_tokens=llm.scheduler.limits.num_speculative_tokens,
            speculative_disable_by_batch_size=(
                llm.scheduler.limits.speculative_disable_by_batch_size)))
