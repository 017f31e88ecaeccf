"""Paged attention over a flat batch: the PyTorch path (the CPU path, and the reference the Triton
kernels are checked against).

The batch is the tokens of every scheduled request back to back, no padding. Requests are
ordered decodes first (one query token each), then prefills (a chunk of one or more query
tokens that attends to the request's cached context and, causally, to itself). K/V live in
per-layer caches shaped [num_blocks, block_size, num_kv_heads, head_dim] and are addressed
through each request's block table.

A cache holds the model's dtype, or fp8 (`FP8_DTYPES`, `--kv-cache-dtype`) with one scale per
cache: stored = K / k_scale, rounded to nearest even and saturated at the format's largest
finite value (as the C kernels write it); read back, K = stored * k_scale. The scales are folded
where they cost nothing: k_scale into the softmax scale, v_scale into the output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

# Query tokens per prefill tile (AttentionMetadata.prefill_tiles): each K/V row a tile reads
# serves this many tokens.
PREFILL_TILE_TOKENS = 16

# fp8 cache dtypes (as --kv-cache-dtype names them) and each one's largest finite value.
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


@dataclass
class AttentionMetadata:
    """Where each token of the flat batch sits; built once per step, shared by every layer."""

    # [num_tokens] cache slot of each new token: block_id * block_size + offset.
    slot_mapping: torch.Tensor
    # [num_reqs, max_blocks] physical block ids of each request, padded with 0.
    block_tables: torch.Tensor
    # [num_reqs] tokens in each request's context after this step (cached + new).
    seq_lens: torch.Tensor
    # [num_reqs + 1] first row of each request's tokens in the flat batch, then the total.
    query_start_loc: torch.Tensor
    # Host-side copies, so no layer has to synchronise with the device to read them. A decode
    # graph (executor decode_graphs.py) gives max_model_len for every sequence instead: an
    # upper bound, which is all the decode kernels read from it (the longest context, to size
    # their grid or gather); its prefill paths never see such a batch.
    query_lens: list[int]
    seq_lens_host: list[int]
    # The first num_decodes requests have exactly one query token.
    num_decodes: int

    @functools.cached_property
    def token_contexts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token of the batch as a one-query request: its request's block table
        ([num_tokens, max_blocks]) and its context length, its position + 1 ([num_tokens]).
        Computed once per step, on first use."""
        if self.num_decodes == len(self.query_lens):
            return self.block_tables, self.seq_lens
        device = self.block_tables.device
        q_lens = torch.tensor(self.query_lens, device=device)
        seq_index = torch.repeat_interleave(torch.arange(len(q_lens), device=device), q_lens)
        row = torch.arange(int(self.query_start_loc[-1]), device=device)
        first_len = self.seq_lens - q_lens + 1  # context length of each request's first token
        lens = first_len[seq_index] + row - self.query_start_loc[:-1].long()[seq_index]
        return self.block_tables[seq_index], lens

    @functools.cached_property
    def prefills_without_context(self) -> bool:
        """Whether the batch has prefill chunks and none has cached context (a batch of new
        prompts: each chunk attends only to itself). Computed once per step, on first use."""
        nd = self.num_decodes
        return nd < len(self.query_lens) and self.seq_lens_host[nd:] == self.query_lens[nd:]

    @functools.cached_property
    def prefill_tiles(self) -> torch.Tensor:
        """The prefill tokens in tiles of up to PREFILL_TILE_TOKENS consecutive tokens of one
        request, for kernels that attend a tile's queries together: [num_tiles, 4] int64 on the
        host, each (request, first flat row, tokens, the first token's context length).
        Computed once per step, on first use."""
        tiles = []
        starts = list(accumulate(self.query_lens, initial=0))
        for request in range(self.num_decodes, len(self.query_lens)):
            start, query_len = starts[request], self.query_lens[request]
            first_len = self.seq_lens_host[request] - query_len + 1
            for offset in range(0, query_len, PREFILL_TILE_TOKENS):
                tiles.append((request, start + offset,
                              min(PREFILL_TILE_TOKENS, query_len - offset), first_len + offset))
        return torch.tensor(tiles, dtype=torch.int64).view(-1, 4)

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
              query_lens: list[int], seq_lens: list[int]) -> AttentionMetadata:
        """The metadata of requests with these query and context lengths; device tensors on
        block_tables' device. The leading single-token requests are the decodes."""
        device = block_tables.device
        num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), len(query_lens))
        return cls(slot_mapping=slot_mapping, block_tables=block_tables,
                   seq_lens=torch.tensor(seq_lens, device=device),
                   query_start_loc=torch.tensor(list(accumulate(query_lens, initial=0)),
                                                dtype=torch.int32, device=device),
                   query_lens=query_lens, seq_lens_host=seq_lens, num_decodes=num_decodes)


def to_cache_format(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it: as it is for the model's dtype; for fp8,
    x / scale saturated at the format's largest value and rounded to nearest even."""
    if cache_dtype not in FP8_MAX:
        return x
    limit = FP8_MAX[cache_dtype]
    return (x.to(torch.float32) / scale).clamp(-limit, limit).to(cache_dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Store the new tokens' K/V ([num_tokens, num_kv_heads, head_dim]) at their slots; a
    negative slot marks a padding token (a decode graph's padded batch, decode_graphs.py), which
    stores nothing. Every kernel set's write keeps this contract."""
    num_kv_heads, head_dim = key_cache.shape[2:]
    padding = slot_mapping < 0
    if padding.any():
        key, value, slot_mapping = key[~padding], value[~padding], slot_mapping[~padding]
    for new, cache, scale in ((key, key_cache, k_scale), (value, value_cache, v_scale)):
        stored = to_cache_format(new, cache.dtype, scale)
        # fp8 through a byte view: index_copy_ has no fp8 kernel on the CPU.
        _bytes_if_fp8(cache).view(-1, num_kv_heads, head_dim).index_copy_(
            0, slot_mapping, _bytes_if_fp8(stored))


def _bytes_if_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype in FP8_MAX else x


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """[..., max_blocks] block ids -> [..., num_kv_heads, max_blocks * block_size, head_dim], in
    `dtype` (an fp8 cache's values converted exactly, not yet scaled).

    index_select on the flattened table: several times faster on CPU than advanced indexing
    (`cache[block_table]`) for the same copy."""
    _, block_size, kv_heads, head_dim = cache.shape
    blocks = _bytes_if_fp8(cache).index_select(0, block_table.reshape(-1))
    if cache.dtype in FP8_MAX:
        blocks = blocks.view(cache.dtype).to(dtype)
    *lead, max_blocks = block_table.shape
    return blocks.view(*lead, max_blocks * block_size, kv_heads, head_dim).transpose(-3, -2)


def _window_mask(key_pos: torch.Tensor, query_pos: torch.Tensor, seq_len: torch.Tensor,
                 sliding_window: int | None) -> torch.Tensor:
    """True where a query may attend: inside the context, causal, inside the window."""
    mask = (key_pos < seq_len) & (key_pos <= query_pos)
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def _attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """softmax(scale q k^T, masked) v, query heads [..., H, L, D] over KV heads
    [..., H / group, S, D]; soft-capped scores written out (SDPA has no cap)."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=True)
    group = query.shape[-3] // keys.shape[-3]
    keys, values = (t.repeat_interleave(group, dim=-3) for t in (keys, values))
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), values.float()).to(query.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0,
                    softcap: float | None = None,
                    fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """query [num_tokens, num_heads, head_dim] -> output of the same shape. `softcap` (Gemma
    2): scaled scores s become softcap * tanh(s / softcap) before the softmax. `fresh_kv`: the
    step's new K and V ([num_tokens, num_kv_heads, head_dim], row for row with query, already
    written to the cache), which a chunk with no cached context attends to as they are, without
    gathering them from the cache, where the cache holds the queries' dtype (an fp8 cache's
    rounded values are what the chunk reads, as its later decodes will).

    Decodes run as one batched attention over their gathered contexts; each prefill runs on its
    own (prefills are few and large, so the loop costs nothing next to their matmuls, while
    padding every request to the longest query would multiply the work).
    """
    out = torch.empty_like(query)
    nd = meta.num_decodes
    scale *= k_scale
    if nd:
        out[:nd] = paged_decode_attention(query[:nd], key_cache, value_cache,
                                          meta.block_tables[:nd], meta.seq_lens[:nd],
                                          max(meta.seq_lens_host[:nd]), scale, sliding_window,
                                          softcap)
    if key_cache.dtype != query.dtype:
        fresh_kv = None
    paged_prefill_attention(query, key_cache, value_cache, meta, scale, sliding_window, out,
                            softcap, fresh_kv)
    return out if v_scale == 1.0 else out.mul_(v_scale)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                           sliding_window: int | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence (query [num_seqs, num_heads, head_dim]), all sequences in
    one masked attention over their gathered contexts (an fp8 cache's values unscaled: the
    caller folds its scales in)."""
    nd = query.shape[0]
    max_blocks = -(-max_seq_len // key_cache.shape[1])
    tables = block_tables[:, :max_blocks]
    keys = _gather_context(key_cache, tables, query.dtype)
    values = _gather_context(value_cache, tables, query.dtype)
    seq_lens = seq_lens[:, None]
    key_pos = torch.arange(keys.shape[-2], device=query.device)
    mask = _window_mask(key_pos, seq_lens - 1, seq_lens, sliding_window)
    # The query heads sharing a KV head act as that head's query rows, so K/V need no
    # expansion to all query heads (query head h reads KV head h // group).
    num_kv_heads = keys.shape[1]
    grouped = query.view(nd, num_kv_heads, -1, query.shape[-1])
    return _attention(grouped, keys, values, mask[:, None, None, :], scale,
                      softcap).reshape(nd, -1, query.shape[-1])


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                            sliding_window: int | None, out: torch.Tensor,
                            softcap: float | None = None,
                            fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The prefill chunks of the batch (the requests after its meta.num_decodes decodes), each
    causal over its cached context and itself, written into their rows of `out`; a chunk with
    no cached context reads `fresh_kv`'s rows when given them."""
    start = meta.num_decodes
    for i in range(meta.num_decodes, len(meta.query_lens)):
        q_len, seq_len = meta.query_lens[i], meta.seq_lens_host[i]
        if fresh_kv is not None and q_len == seq_len:
            keys, values = (t[start:start + q_len].transpose(0, 1) for t in fresh_kv)
        else:
            num_blocks = -(-seq_len // key_cache.shape[1])
            table = meta.block_tables[i, :num_blocks]
            keys = _gather_context(key_cache, table, query.dtype)[:, :seq_len]
            values = _gather_context(value_cache, table, query.dtype)[:, :seq_len]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)
        mask = _window_mask(key_pos, query_pos, torch.tensor(seq_len), sliding_window)
        q = query[start:start + q_len].transpose(0, 1)  # [num_heads, q_len, head_dim]
        out[start:start + q_len] = _attention(q, keys, values, mask, scale,
                                              softcap).transpose(0, 1)
        start += q_len
