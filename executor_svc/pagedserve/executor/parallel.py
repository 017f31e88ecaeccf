"""Tensor parallelism: which slice of the model a rank holds, and the collectives that join the
slices (docs/design.md §5).

A group of N ranks splits every decoder layer the Megatron way: q/k/v and the MLP's first
projection are column-parallel (each rank computes its own attention heads and its slice of the
intermediate features, no communication), the attention output and the MLP's last projection
are row-parallel (each rank holds the matching input slice; the partial sums are all-reduced).
So a layer costs two all-reduces of [tokens, hidden] (and an all-gather of its input for a
row-parallel layer of an act-order GPTQ checkpoint whose groups span ranks: models/layers.py).
The embedding and the LM head are split by vocabulary rows: a token's embedding comes from the
rank that holds its row (all-reduce), and the logits are gathered to rank 0, which samples.

KV heads split with the query heads when N divides their number; with fewer KV heads than ranks
(multi-query attention) each KV head is replicated on the ranks whose query heads read it.

How the ranks are started and fed is executor_svc/pagedserve/executor/tp_group.py; this module is
what the model code sees. `SINGLE` (one rank, no process group) costs nothing: every collective is a
no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks; the message says why."""


@dataclass(frozen=True)
class HeadSplit:
    """One rank's share of an attention layer's heads."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    kv_pieces: int  # how many distinct KV slices the ranks hold (< size: replicated)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None only for a single rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def split(self, total: int, what: str) -> int:
        """`total` divided evenly over the ranks; a clear error where it does not divide."""
        if total % self.size:
            raise TensorParallelError(f"{what} ({total}) is not divisible by "
                                      f"--tensor-parallel-size {self.size}")
        return total // self.size

    def split_heads(self, num_heads: int, num_kv_heads: int) -> HeadSplit:
        heads = self.split(num_heads, "the number of attention heads")
        if num_kv_heads % self.size == 0:
            return HeadSplit(heads, num_kv_heads // self.size, self.size)
        if self.size % num_kv_heads == 0:
            return HeadSplit(heads, 1, num_kv_heads)
        raise TensorParallelError(
            f"the number of KV heads ({num_kv_heads}) and --tensor-parallel-size {self.size} "
            "do not divide one another")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x` concatenated along the last dimension, on rank 0; None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` concatenated along the last dimension, in rank order, on every
        rank."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (the others pass a tensor of the same shape and dtype)."""
        if self.size > 1:
            x = x.contiguous()
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' values (each rank's KV capacity: the group's is the
        least of them, block ids being shared)."""
        if self.size == 1:
            return value
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())


SINGLE = TensorParallel()
