"""Mixture-of-experts feed-forward (PyTorch path, the torch and cpu sets): each token's output
is the weighted sum of its top-k experts' gated MLPs,

    out[t] = sum_j weights[t, j] * w2[e] act_and_mul(w13[e] x[t]),  e = ids[t, j].

The (token, expert) pairs are sorted by expert once, and each expert that received tokens runs
two matmuls over all of them: the Python loop is over experts (a few dozen at most), never over
tokens. Outputs accumulate in float32."""

from collections.abc import Callable

import torch


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, act_and_mul: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (each expert's gate rows, then its up rows); w2 [E, H, I];
    weights [T, k] (float32) and ids [T, k] (expert indices) from the router. Returns [T, H]
    in x's dtype (under tensor parallelism each rank's partial sum: I is its slice)."""
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # one host read per layer
    tokens = order // top_k
    pair_weights = weights.reshape(-1)[order, None]
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = tokens[start:start + count]
            hidden = act_and_mul(x[rows] @ w13[expert].t()) @ w2[expert].t()
            out.index_add_(0, rows, hidden.float() * pair_weights[start:start + count])
        start += count
    return out.to(x.dtype)
