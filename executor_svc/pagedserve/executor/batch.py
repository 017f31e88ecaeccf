"""The flat batch of one step: every scheduled token back to back, no padding, with the
metadata that drives prefill, chunked prefill and decode alike (docs/design.md §5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedserve.executor.transfers import tensor_on, to_device
from pagedserve.kernels.attention import AttentionMetadata


@dataclass
class ScheduledSequence:
    """One request's share of a step."""

    # The tokens computed this step (a prefill chunk, or the one token of a decode).
    token_ids: list[int]
    # Tokens whose K/V are already in the cache before this step.
    num_computed: int
    # Physical block ids, covering at least num_computed + len(token_ids) tokens.
    block_table: list[int]


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    meta: AttentionMetadata
    # [num_seqs] row of each sequence's last token: where its next token's logits come from.
    last_token_rows: torch.Tensor


def build_flat_batch(seqs: Sequence[ScheduledSequence], block_size: int,
                     device: torch.device | str = "cpu") -> FlatBatch:
    """`seqs` must list single-token sequences (decodes) first."""
    query_lens = [len(s.token_ids) for s in seqs]
    seq_lens = [s.num_computed + q for s, q in zip(seqs, query_lens, strict=True)]
    num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(seqs))
    if any(q == 1 for q in query_lens[num_decodes:]):
        raise ValueError("decodes (single-token sequences) must come first in the batch")
    max_blocks = max(len(s.block_table) for s in seqs)
    block_tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table))
                                 for s in seqs], dtype=torch.long)

    q_lens = torch.tensor(query_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens  # first row of each sequence
    seq_index = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    offsets = torch.arange(int(q_lens.sum())) - starts[seq_index]
    positions = torch.tensor([s.num_computed for s in seqs])[seq_index] + offsets
    slot_mapping = block_tables[seq_index, positions // block_size] * block_size \
        + positions % block_size

    device = torch.device(device)
    meta = AttentionMetadata.build(to_device(slot_mapping, device),
                                   to_device(block_tables, device), query_lens, seq_lens)
    input_ids = tensor_on([t for s in seqs for t in s.token_ids], device)
    return FlatBatch(input_ids=input_ids, positions=to_device(positions, device), meta=meta,
                     last_token_rows=to_device(starts + q_lens - 1, device))
