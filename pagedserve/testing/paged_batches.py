"""Paged batches for the attention kernels' tests: random K/V written through shuffled block
tables into caches whose unused slots hold NaN (a kernel that reads one shows it)."""

import torch

from pagedserve.kernels.attention import AttentionMetadata, write_kv_cache

BLOCK = 16


def build_batch(gen, dtype, num_kv_heads, head_dim, seq_lens, num_blocks=24, block_size=BLOCK):
    """Random K/V for every context position written into NaN-poisoned caches through shuffled
    block tables (padded with a block nobody owns). Returns (key_cache, value_cache, tables,
    keys, values, slot_mapping) where keys/values are the flat new tokens written."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    unused = free.pop()  # padding in the tables: a block holding only NaN
    tables, slots = [], []
    for seq_len in seq_lens:
        table = [free.pop() for _ in range(-(-seq_len // block_size))]
        positions = torch.arange(seq_len)
        slots.append(torch.tensor(table)[positions // block_size] * block_size
                     + positions % block_size)
        tables.append(table)
    max_blocks = max(map(len, tables)) + 1
    tables = torch.tensor([t + [unused] * (max_blocks - len(t)) for t in tables])
    slot_mapping = torch.cat(slots)
    num_tokens = slot_mapping.numel()
    keys = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    values = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    return key_cache, value_cache, tables, keys, values, slot_mapping


def mixed_batch(gen, dtype, num_heads, num_kv_heads, head_dim, decodes, prefills,
                num_blocks=32, block_size=BLOCK):
    """Caches of `num_blocks` blocks holding every context position (chunks included), the
    flat query and the metadata of `decodes` then `prefills` (in a shuffled order)."""
    order = torch.randperm(len(prefills), generator=gen).tolist()
    prefills = [prefills[i] for i in order]
    seq_lens = decodes + [ctx + q_len for ctx, q_len in prefills]
    query_lens = [1] * len(decodes) + [q_len for _, q_len in prefills]
    key_cache, value_cache, tables, keys, values, slots = build_batch(
        gen, dtype, num_kv_heads, head_dim, seq_lens, num_blocks=num_blocks,
        block_size=block_size)
    write_kv_cache(keys, values, key_cache, value_cache, slots)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    # A one-token chunk right after the decodes counts as one of them (it is one).
    meta = AttentionMetadata.build(slots[:0], tables, query_lens, seq_lens)
    return key_cache, value_cache, query, meta
