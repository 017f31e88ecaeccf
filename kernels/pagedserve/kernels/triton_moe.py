"""Mixture-of-experts feed-forward in Triton: a grouped GEMM over the tokens routed to each
expert, as `moe.fused_moe` computes it.

The (token, slot) pairs are grouped by expert on the device (`align_pairs`: a sort, no host
sync), each expert's group padded to whole BLOCK_M tiles; one program then multiplies a tile of
one expert's pairs by a BLOCK_N slice of that expert's weight, gathering the pairs' input rows
through their indices. Two such GEMMs (w13, then w2 on the activated rows, each pair's row
scaled by its routing weight) and a sum over each token's k pairs give the output."""

import torch
import triton
import triton.language as tl


def align_pairs(ids: torch.Tensor, num_experts: int,
                block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, k] -> (pairs, tile_experts). pairs: the flat pair indices (t * k + j) grouped by
    expert, each group padded with the sentinel T * k to a multiple of block_m; tile_experts:
    each tile's expert (num_experts for tiles past the last group). Sized by the worst case
    (every expert's group needing padding), so no host read."""
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    rank = torch.arange(num_pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[experts]
    size = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    pairs = torch.full((size,), num_pairs, dtype=torch.int32, device=ids.device)
    pairs[(padded_end - padded)[experts] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, size, block_m, device=ids.device)
    tile_experts = torch.searchsorted(padded_end, tile_starts, right=True).to(torch.int32)
    return pairs, tile_experts


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, c_ptr, pairs_ptr, tile_experts_ptr, weights_ptr,
                         num_pairs, num_experts, N, K, stride_am, stride_we, stride_wn,
                         stride_cm, ROWS_PER_A: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         IEEE: tl.constexpr):
    """c[pair] = a[pair // ROWS_PER_A] @ w[expert]^T (times the pair's weight)."""
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile)
    if expert >= num_experts:  # past the last group
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + offs_m)
    valid = pairs < num_pairs  # padding carries the sentinel
    a_rows = (pairs // ROWS_PER_A).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if MUL_WEIGHTS:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, pairs: torch.Tensor,
                  tile_experts: torch.Tensor, weights: torch.Tensor | None, rows_per_a: int,
                  block_m: int) -> None:
    num_experts, n, k = w.shape
    assert a.stride(-1) == 1 and w.stride(-1) == 1 and out.stride(-1) == 1
    block_n = 64
    grid = (tile_experts.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, pairs, tile_experts, weights if weights is not None else out,
        out.shape[0], num_experts, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ROWS_PER_A=rows_per_a, MUL_WEIGHTS=weights is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=32 if k <= 32 else 64, IEEE=a.dtype == torch.float32)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     weights: torch.Tensor, ids: torch.Tensor, act_and_mul) -> torch.Tensor:
    """As `moe.fused_moe` (same arguments and result)."""
    num_tokens, top_k = ids.shape
    num_pairs = num_tokens * top_k
    # Small tiles while few pairs share an expert (decode batches), larger ones for prefill.
    block_m = 16 if num_pairs <= 4 * w13.shape[0] * 16 else 64
    pairs, tile_experts = align_pairs(ids, w13.shape[0], block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x.contiguous(), w13, gate_up, pairs, tile_experts, None, top_k, block_m)
    activated = act_and_mul(gate_up).contiguous()
    down = torch.empty(num_pairs, w2.shape[1], dtype=torch.float32, device=x.device)
    _grouped_gemm(activated, w2, down, pairs, tile_experts,
                  weights.reshape(-1).float().contiguous(), 1, block_m)
    return down.view(num_tokens, top_k, -1).sum(1).to(x.dtype)
