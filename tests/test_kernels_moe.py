"""The mixture-of-experts feed-forward: the PyTorch path (torch and cpu sets) against a float64
loop over tokens, written from the definition, and the Triton grouped GEMM (under Triton's
interpreter on CPU) against the PyTorch path; the device-side grouping of pairs by expert."""

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.activation import silu_and_mul
from pagedserve.kernels.moe import fused_moe

# (tokens, experts, top_k, hidden, intermediate): a decode batch, a prefill, one token, and
# more experts than pairs (most experts receive nothing).
SHAPES = [(5, 4, 2, 64, 48), (70, 8, 2, 64, 96), (1, 4, 1, 32, 16), (3, 16, 4, 32, 40)]


def _inputs(tokens, experts, top_k, hidden, intermediate, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, intermediate, generator=gen) / intermediate ** 0.5
          ).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return x, w13, w2, weights, ids


def _definition(x, w13, w2, weights, ids):
    """Token by token, expert by expert, in float64."""
    x, w13, w2, weights = x.double(), w13.double(), w2.double(), weights.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_the_torch_path_follows_the_definition(shape):
    x, w13, w2, weights, ids = _inputs(*shape, torch.float32, seed=sum(shape))
    out = fused_moe(x, w13, w2, weights, ids, silu_and_mul)
    torch.testing.assert_close(out.double(), _definition(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [16, 64])
def test_pairs_are_grouped_by_expert_in_whole_tiles(block_m):
    triton_moe = pytest.importorskip("pagedserve.kernels.triton_moe")
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])
    pairs, tile_experts = triton_moe.align_pairs(ids, 5, block_m)
    flat = ids.reshape(-1)
    sentinel = flat.numel()
    tiles = pairs.view(-1, block_m)
    seen = []
    for tile, expert in zip(tiles.tolist(), tile_experts.tolist(), strict=True):
        real = [p for p in tile if p != sentinel]
        if expert == 5:  # past the last group: padding only
            assert not real
            continue
        assert real and all(int(flat[p]) == expert for p in real)
        assert tile[:len(real)] == real  # a group's pairs first, then its padding
        seen += real
    assert sorted(seen) == list(range(sentinel))  # every pair exactly once


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_triton_grouped_gemm_matches_the_torch_path(shape, dtype):
    triton_moe = pytest.importorskip("pagedserve.kernels.triton_moe")
    x, w13, w2, weights, ids = _inputs(*shape, dtype, seed=3 * sum(shape))
    out = triton_moe.fused_moe_triton(x, w13, w2, weights, ids, silu_and_mul)
    expected = fused_moe(x, w13, w2, weights, ids, silu_and_mul)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
