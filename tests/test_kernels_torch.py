"""The PyTorch kernels against naive float64 references written from the definitions."""

import math

import pytest
import torch

from pagedserve.kernels.attention import AttentionMetadata, paged_attention, write_kv_cache
from pagedserve.kernels.norm import add_rms_norm, rms_norm
from pagedserve.kernels.rotary import apply_rotary

BLOCK = 4


def naive_attention(q, k, v, seq_len, scale, window):
    """q [q_len, H, D], k/v [seq_len, Hkv, D] (float64): causal softmax attention, by loops."""
    q_len, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(q_len):
        pos = seq_len - q_len + t
        for h in range(num_heads):
            keys = [j for j in range(seq_len) if j <= pos and (window is None or j > pos - window)]
            scores = torch.stack([q[t, h] @ k[j, h // group] for j in keys]) * scale
            weights = torch.softmax(scores, dim=0)
            out[t, h] = sum(w * v[j, h // group] for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_attention_matches_naive_float64(window, dtype, tol, fresh):
    """fresh: given the step's new K/V rows, the chunk with no cached context reads them: its
    slots in the cache then hold garbage, which must not reach the output."""
    gen = torch.Generator().manual_seed(0)
    num_heads, kv_heads, head_dim, num_blocks = 4, 2, 8, 64
    # (context before this step, query tokens): decodes first, then prefills and chunks.
    requests = [(0, 1), (BLOCK - 1, 1), (BLOCK, 1), (2 * BLOCK + 5, 1),
                (0, BLOCK + 1), (BLOCK - 1, 3), (3 * BLOCK, 2 * BLOCK + 3)]
    # Slots no request owns hold large garbage: reading one through a wrong mask shows up.
    # (Not NaN: the PyTorch path gathers whole blocks and masks scores, and 0 * NaN is NaN;
    # caches start zeroed and only ever hold finite values the model wrote.)
    key_cache = torch.full((num_blocks, BLOCK, kv_heads, head_dim), 1e4, dtype=dtype)
    value_cache = torch.full_like(key_cache, -1e4)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, queries, contexts = [], [], [], []
    for cached, q_len in requests:
        seq_len = cached + q_len
        table = [free.pop() for _ in range(-(-seq_len // BLOCK))]
        k = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, kv_heads, head_dim, generator=gen).to(dtype)
        positions = torch.arange(seq_len)
        slot = torch.tensor(table)[positions // BLOCK] * BLOCK + positions % BLOCK
        write_kv_cache(k[:cached], v[:cached], key_cache, value_cache, slot[:cached])
        tables.append(table)
        slots.append(slot[cached:])
        queries.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        contexts.append((k, v))
    new_k = torch.cat([k[c:] for (k, _), (c, _) in zip(contexts, requests, strict=True)])
    new_v = torch.cat([v[c:] for (_, v), (c, _) in zip(contexts, requests, strict=True)])
    slot_mapping = torch.cat(slots)
    write_kv_cache(new_k, new_v, key_cache, value_cache, slot_mapping)
    max_blocks = max(map(len, tables))
    meta = AttentionMetadata.build(
        slot_mapping, torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables]),
        query_lens=[q for _, q in requests], seq_lens=[c + q for c, q in requests])
    assert meta.num_decodes == 4
    if fresh:
        chunk = meta.query_start_loc[4:6].tolist()  # (0, BLOCK + 1): no cached context
        for cache in key_cache, value_cache:
            cache.view(-1, kv_heads, head_dim)[slot_mapping[chunk[0]:chunk[1]]] = 1e4
    scale = 1 / math.sqrt(head_dim)
    out = paged_attention(torch.cat(queries), key_cache, value_cache, meta, scale, window,
                          fresh_kv=(new_k, new_v) if fresh else None)

    expected = torch.cat([
        naive_attention(q.double(), k.double(), v.double(), c + q.shape[0], scale, window)
        for q, (k, v), (c, _) in zip(queries, contexts, requests, strict=True)])
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_rms_norm_and_fused_add():
    gen = torch.Generator().manual_seed(1)
    x, res, w = (torch.randn(5, 16, generator=gen) for _ in range(3))

    def ref(t):
        t = t.double()
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(rms_norm(x, w, 1e-6).double(), ref(x))
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(normed.double(), ref(x + res))


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rotary_rotates_pairs_by_position(neox, rotary_dim):
    gen = torch.Generator().manual_seed(2)
    head_dim, base = 8, 10000.0
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    angles = torch.arange(32).double()[:, None] * inv_freq
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    x = torch.randn(3, 2, head_dim, generator=gen).double()
    positions = torch.tensor([0, 5, 31])
    out = apply_rotary(x, positions, cache, neox)
    for t, p in enumerate(positions.tolist()):
        for i in range(rotary_dim // 2):
            a, b = (i, i + rotary_dim // 2) if neox else (2 * i, 2 * i + 1)
            c, s = math.cos(p * inv_freq[i]), math.sin(p * inv_freq[i])
            torch.testing.assert_close(out[t, :, a], x[t, :, a] * c - x[t, :, b] * s)
            torch.testing.assert_close(out[t, :, b], x[t, :, b] * c + x[t, :, a] * s)
        torch.testing.assert_close(out[t, :, rotary_dim:], x[t, :, rotary_dim:])
