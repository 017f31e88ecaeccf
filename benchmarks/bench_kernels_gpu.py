"""The Triton kernels on a GPU (issue 6): each checked against its PyTorch reference, then timed.

    python benchmarks/bench_kernels_gpu.py [--json results.json]
    # on a machine where nothing can be installed, from the source tree (pagedserve/__init__.py):
    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \
        python3 benchmarks/bench_kernels_gpu.py
    python benchmarks/bench_kernels_gpu.py --smoke   # tiny shapes, CPU, Triton's interpreter

1. Correctness: every kernel against the PyTorch path (kernels/), on the GPU, in float32,
   float16 and bfloat16 (bfloat16 only compiled: the interpreter's bf16 is wrong), random inputs
   drawn fresh, outputs poisoned with NaN before the run, tolerances by dtype.
2. Decode attention: median time (triton.testing.do_bench) and the bandwidth it achieves (bytes
   of K/V read per second) beside the card's measured copy bandwidth (bytes read + written per
   second of a 2 GiB device-to-device copy) and beside scaled_dot_product_attention on the same
   shapes with contiguous K/V; split-K partitions and tile shapes swept.
3. Prefill attention: TFLOP/s (causal: the attended pairs only) beside scaled_dot_product_attention
   (causal, contiguous K/V), candidate tile shapes swept.
4. Norms, rotary, SiLU-and-mul: time and bandwidth beside the PyTorch path.
4b. Quantized linears (docs/quantization.md): the Triton grouped matmul (4-bit values, groups
   of 32 and 128, with offsets, held a byte each and in 4 bits; 5-bit values in groups of 32
   and 6-bit ones in groups of 16 held in their bits) against the PyTorch path in every dtype,
   and fp8's
   torch._scaled_mm against the dequantized operands where the card has fp8 tensor cores
   (checks); their time beside bf16's torch matmul and the weight bytes each streams, at batch
   1, 16 and 256 on LLaMA-8B-shaped layers.
4c. Mixture of experts (issue 22): the Triton grouped GEMM against the PyTorch loop over
   experts in every dtype (checks), and both timed on a Mixtral-8x7B-shaped and a
   Qwen3-30B-A3B-shaped layer at 1, 16, 64 and 512 tokens, with the bytes of the experts hit
   read per ms.
5. End to end: the offline engine on a small random LLaMA on the GPU with the Triton and the
   PyTorch kernel sets: greedy tokens equal in float32, first tokens agreeing on at least 90%
   of the prompts in bfloat16, seeded sampling reproducing within each engine (its generators
   live on the GPU) (checks), and generation throughput.

--smoke runs every step on tiny shapes on the CPU (wall-clock medians, meaningless as speed),
so the test suite keeps this script working without a GPU.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before torch imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import itertools
import json
import math
import pathlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import triton

from pagedserve.kernels.activation import silu_and_mul
from pagedserve.kernels.attention import AttentionMetadata, paged_attention, write_kv_cache
from pagedserve.kernels.moe import fused_moe
from pagedserve.kernels.norm import add_rms_norm, rms_norm
from pagedserve.kernels.quantization import (
    GroupedWeight,
    fp8_linear,
    fp8_supported,
    quantize_fp8,
    quantized_linear,
    scaled_mm,
)
from pagedserve.kernels.rotary import apply_rotary
from pagedserve.kernels.triton_activation import silu_and_mul_triton
from pagedserve.kernels.triton_attention import (
    DECODE_TILES,
    MAX_TILE_HEADS,
    Tiles,
    paged_attention_decode_triton,
    paged_attention_prefill_triton,
    paged_attention_triton,
    prefill_tiles,
    write_kv_cache_triton,
)
from pagedserve.kernels.triton_moe import fused_moe_triton
from pagedserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from pagedserve.kernels.triton_quantization import pack_quantized_triton, quantized_linear_triton
from pagedserve.kernels.triton_rotary import apply_rotary_triton

BLOCK = 16
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# End to end in bfloat16, the share of prompts whose first greedy token may differ between the
# Triton and the PyTorch kernel sets (near-ties of random weights; tests/test_bf16_parity.py
# allows 2 of 16 between bfloat16 and float32 on the default model).
BF16_FIRST_TOKEN_DISAGREEMENT = 0.1
# A prefill tile's block_m counts rows: tokens times the query heads of one KV head.
PREFILL_CANDIDATES = [Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 3), Tiles(64, 32, 4, 3),
                      Tiles(64, 128, 4, 2),
                      Tiles(128, 64, 8, 2), Tiles(128, 64, 8, 3), Tiles(128, 128, 8, 2),
                      Tiles(128, 128, 8, 3), Tiles(128, 64, 4, 3)]
DECODE_CANDIDATES = [DECODE_TILES, Tiles(16, 32, 4, 2), Tiles(16, 128, 4, 2),
                     Tiles(16, 64, 8, 2), Tiles(16, 64, 4, 3), Tiles(16, 128, 8, 3)]


@dataclass
class Check:
    kernel: str
    dtype: str
    max_abs_err: float
    tol: float
    passed: bool


class Bench:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.checks: list[Check] = []
        self.results: dict[str, object] = {}
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device, dtype)

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn."""
        if self.device.type == "cuda":
            return float(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                 return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    def check(self, kernel: str, dtype: torch.dtype, out: torch.Tensor,
              expected: torch.Tensor) -> None:
        tol = TOL[dtype]
        err = (out.float() - expected.float()).abs()
        bound = tol + tol * expected.float().abs()
        finite = bool(out.isfinite().all())
        max_err = float(err.max()) if finite else math.inf
        passed = finite and bool((err <= bound).all())
        self.checks.append(Check(kernel, str(dtype).removeprefix("torch."), max_err, tol,
                                 passed))
        print(f"  {'ok  ' if passed else 'FAIL'} {kernel:<44} {self.checks[-1].dtype:<9} "
              f"max |err| {max_err:.2e}", flush=True)


# ---------------------------------------------------------------------------------------------
# Paged batches


def paged_batch(bench: Bench, dtype, num_kv_heads, head_dim, seq_lens, spare_blocks=2):
    """K/V of every position of `seq_lens` written through shuffled block tables into caches
    poisoned with NaN. Returns (key_cache, value_cache, block_tables, slot_mapping, keys,
    values)."""
    blocks = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(blocks) + spare_blocks
    shape = (num_blocks, BLOCK, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=bench.device)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=bench.device)
    order = torch.randperm(num_blocks, generator=bench.gen)
    tables, slots, start = [], [], 0
    for n, b in zip(seq_lens, blocks, strict=True):
        table = order[start:start + b]
        start += b
        pos = torch.arange(n)
        slots.append(table[pos // BLOCK] * BLOCK + pos % BLOCK)
        tables.append(torch.cat([table, order[-1:].expand(max(blocks) - b)]))
    block_tables = torch.stack(tables).to(bench.device)
    slot_mapping = torch.cat(slots).to(bench.device)
    keys = bench.randn(len(slot_mapping), num_kv_heads, head_dim, dtype=dtype)
    values = bench.randn(len(slot_mapping), num_kv_heads, head_dim, dtype=dtype)
    write_kv_cache_triton(keys, values, key_cache, value_cache, slot_mapping)
    return key_cache, value_cache, block_tables, slot_mapping, keys, values


def check_attention(bench: Bench, dtype: torch.dtype) -> None:
    # Head size 256 as well: its tiles must shrink to fit shared memory (float32 above all).
    for head_dim in (128,) if bench.smoke else (128, 256):
        _check_attention(bench, dtype, head_dim)


def _check_attention(bench: Bench, dtype: torch.dtype, head_dim: int) -> None:
    long = 300 if bench.smoke else 3000
    num_heads, num_kv_heads = 8, 2
    seq_lens = [1, BLOCK - 1, BLOCK, BLOCK + 1, long, 2 * long // 3]
    key_cache, value_cache, tables, slots, keys, values = paged_batch(
        bench, dtype, num_kv_heads, head_dim, seq_lens)
    ref_k = torch.zeros_like(key_cache)
    ref_v = torch.zeros_like(value_cache)
    write_kv_cache(keys, values, ref_k, ref_v, slots)
    written = torch.zeros(key_cache.shape[:2], dtype=torch.bool, device=bench.device)
    written.view(-1)[slots] = True
    exact = bool((key_cache[written] == ref_k[written]).all()
                 and (value_cache[written] == ref_v[written]).all()
                 and key_cache[~written].isnan().all())
    bench.checks.append(Check("write_kv_cache (exact, untouched slots stay NaN)",
                              str(dtype).removeprefix("torch."), 0.0, 0.0, exact))
    print(f"  {'ok  ' if exact else 'FAIL'} write_kv_cache exact              "
          f"{str(dtype).removeprefix('torch.')}", flush=True)
    # The PyTorch path masks scores after gathering whole blocks, so it reads zeroed slots.
    clean_k, clean_v = key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0)
    scale = head_dim ** -0.5
    query = bench.randn(len(seq_lens), num_heads, head_dim, dtype=dtype)
    meta = AttentionMetadata.build(slots[:0], tables, [1] * len(seq_lens), seq_lens)
    for window in (None, 200):
        expected = paged_attention(query, clean_k, clean_v, meta, scale, window)
        for partition in (None, 128):
            out = torch.full_like(query, float("nan"))
            paged_attention_decode_triton(query, key_cache, value_cache, tables,
                                          meta.seq_lens, scale, window, out=out,
                                          partition_size=partition)
            bench.check(f"decode d={head_dim} window={window} partition={partition}", dtype,
                        out, expected)
    # A mixed batch: decodes, then chunks over cached context (prefix hits, chunked prefill).
    decodes = [BLOCK + 1, 1, long]
    chunks = [(0, 70), (BLOCK - 1, 1), (BLOCK, 33), (long // 2, 100)]
    seq_lens = decodes + [c + q for c, q in chunks]
    query_lens = [1] * len(decodes) + [q for _, q in chunks]
    key_cache, value_cache, tables, slots, _, _ = paged_batch(bench, dtype, num_kv_heads,
                                                              head_dim, seq_lens)
    query = bench.randn(sum(query_lens), num_heads, head_dim, dtype=dtype)
    meta = AttentionMetadata.build(slots[:0], tables, query_lens, seq_lens)
    for window in (None, 50):
        expected = paged_attention(query, key_cache.nan_to_num(0.0),
                                   value_cache.nan_to_num(0.0), meta, scale, window)
        out = torch.full_like(query, float("nan"))
        paged_attention_triton(query, key_cache, value_cache, meta, scale, window, out=out)
        bench.check(f"mixed decode + prefill d={head_dim} window={window}", dtype, out,
                    expected)
    # Chunks with no cached context read the step's own K/V rows (varlen), not the cache.
    decodes, chunks = [BLOCK + 1, long], [70, 2 * long // 3]
    seq_lens = decodes + chunks
    key_cache, value_cache, tables, slots, keys, values = paged_batch(
        bench, dtype, num_kv_heads, head_dim, seq_lens)
    step = torch.cat([torch.arange(end - n, end) for end, n in
                      zip(itertools.accumulate(seq_lens), [1, 1] + chunks, strict=True)]
                     ).to(bench.device)
    query = bench.randn(len(step), num_heads, head_dim, dtype=dtype)
    meta = AttentionMetadata.build(slots[:0], tables, [1, 1] + chunks, seq_lens)
    expected = paged_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0),
                               meta, scale)
    out = torch.full_like(query, float("nan"))
    paged_attention_triton(query, key_cache, value_cache, meta, scale, out=out,
                           fresh_kv=(keys[step], values[step]))
    bench.check(f"decode + varlen prefill d={head_dim}", dtype, out, expected)


def check_layer_kernels(bench: Bench, dtype: torch.dtype) -> None:
    tokens, hidden = (7, 96) if bench.smoke else (1000, 4096)
    x = bench.randn(tokens, hidden, dtype=dtype, scale=3)
    residual = bench.randn(tokens, hidden, dtype=dtype)
    weight = (1 + 0.1 * bench.randn(hidden)).to(dtype)
    bench.check("rms_norm", dtype, rms_norm_triton(x, weight, 1e-6), rms_norm(x, weight, 1e-6))
    out, new_res = add_rms_norm_triton(x, residual, weight, 1e-6)
    ref_out, ref_res = add_rms_norm(x, residual, weight, 1e-6)
    bench.check("add_rms_norm (residual)", dtype, new_res, ref_res)
    bench.check("add_rms_norm (normed)", dtype, out, ref_out)
    positions = torch.randint(0, 4096, (tokens,), generator=bench.gen).to(bench.device)
    for head_dim, rotary_dim, neox in ((128, 128, True), (128, 128, False), (80, 20, True)):
        q = bench.randn(tokens, 4, head_dim, dtype=dtype)
        angles = torch.rand(4096, rotary_dim // 2, generator=bench.gen) * 6
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(bench.device)
        bench.check(f"rotary head_dim={head_dim} rotary_dim={rotary_dim} neox={neox}", dtype,
                    apply_rotary_triton(q, positions, cos_sin, neox),
                    apply_rotary(q, positions, cos_sin, neox))
    gate_up = bench.randn(tokens, 2 * hidden, dtype=dtype, scale=4)
    bench.check("silu_and_mul", dtype, silu_and_mul_triton(gate_up), silu_and_mul(gate_up))


def check_quantized_linears(bench: Bench, dtype: torch.dtype) -> None:
    rows, n, k = (5, 70, 256) if bench.smoke else (300, 4096, 4096)
    x = bench.randn(rows, k, dtype=dtype)
    for bits, group in ((4, 32), (4, 128), (5, 32), (6, 16)):
        weight = grouped_on_device(bench, n, k, group, bits)
        expected = quantized_linear(x, weight, None)
        if bits == 4:
            bench.check(f"grouped linear 4-bit g={group} (a byte each)", dtype,
                        quantized_linear_triton(x, weight, None), expected)
        bench.check(f"grouped linear {bits}-bit g={group} (in {bits} bits)", dtype,
                    quantized_linear_triton(x, pack_quantized_triton(weight), None), expected)
    if fp8_supported(bench.device):
        fp8 = quantize_fp8(bench.randn(n, k))
        q, token_scales = (quantize_fp8(x).qweight, quantize_fp8(x).scales)
        expected = (q.float() * token_scales[:, None]) @ fp8.dequantized(torch.float32).T
        bench.check("fp8 scaled_mm", dtype, scaled_mm(q, token_scales, fp8).to(dtype),
                    expected)


def grouped_on_device(bench: Bench, n: int, k: int, group: int, bits: int = 4) -> GroupedWeight:
    """Random unsigned values of `bits` bits (held one per byte) with scales and offsets per
    group."""
    levels = 1 << bits
    values = torch.randint(0, levels, (n, k), generator=bench.gen, dtype=torch.int8)
    scales = torch.rand(n, k // group, generator=bench.gen) / (4 * levels)
    offsets = -levels / 2 * scales
    return GroupedWeight(values.to(bench.device), scales.to(bench.device),
                         offsets.to(bench.device))


# ---------------------------------------------------------------------------------------------
# Timings


def copy_bandwidth(bench: Bench) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    nbytes = (1 << 20) if bench.smoke else (2 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench.time_ms(lambda: dst.copy_(src)) / 1e3)


def bench_decode(bench: Bench, copy_bw: float) -> list[dict]:
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    shapes = [(2, 200)] if bench.smoke else [(64, 4096), (256, 1024), (16, 4096), (4, 16384),
                                             (1, 32768)]
    rows = []
    for batch, ctx in shapes:
        rows += _decode_case(bench, dtype, batch, ctx, num_heads, num_kv_heads, head_dim,
                             copy_bw)
    return rows


def _decode_case(bench: Bench, dtype: torch.dtype, batch: int, ctx: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, copy_bw: float) -> list[dict]:
    rows = []
    key_cache, value_cache, tables, _, _, _ = paged_batch(
        bench, dtype, num_kv_heads, head_dim, [ctx] * batch, spare_blocks=1)
    seq_lens = torch.full((batch,), ctx, device=bench.device)
    query = bench.randn(batch, num_heads, head_dim, dtype=dtype)
    out = torch.empty_like(query)
    scale = head_dim ** -0.5
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * key_cache.element_size()

    def run(partition=None, tiles=DECODE_TILES):
        return lambda: paged_attention_decode_triton(
            query, key_cache, value_cache, tables, seq_lens, scale, out=out,
            max_seq_len=ctx, partition_size=partition, tiles=tiles)

    variants = {"triton auto": run()}
    variants["triton no split"] = run(partition=10 ** 9)
    for partition in (128,) if bench.smoke else (256, 512, 1024, 2048):
        if partition < ctx:
            variants[f"triton split {partition}"] = run(partition=partition)
    for tiles in [] if bench.smoke else DECODE_CANDIDATES[1:]:
        variants[f"triton no split {tiles}"] = run(partition=10 ** 9, tiles=tiles)
    # SDPA on the same K/V laid out contiguously (what a non-paged engine reads).
    used = tables[:, :-(-ctx // BLOCK)]
    k, v = (cache.nan_to_num(0)[used].reshape(batch, -1, num_kv_heads, head_dim)[:, :ctx]
            .transpose(1, 2).contiguous() for cache in (key_cache, value_cache))
    q4 = query[:, :, None, :]
    variants["sdpa contiguous"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, k, v, scale=scale, enable_gqa=True)
    for name, fn in variants.items():
        ms = bench.time_ms(fn)
        rows.append(dict(batch=batch, context=ctx, variant=name, ms=ms,
                         kv_gbps=kv_bytes / ms / 1e6,
                         fraction_of_copy_bw=kv_bytes / (ms / 1e3) / copy_bw))
        print(f"  decode b={batch:<4} ctx={ctx:<6} {name:<52} {ms:8.3f} ms "
              f"{rows[-1]['kv_gbps']:8.0f} GB/s  {rows[-1]['fraction_of_copy_bw']:.0%} "
              "of copy", flush=True)
    return rows


def causal_flops(chunks: list[tuple[int, int]], num_heads: int, head_dim: int) -> float:
    """QK^T and PV over the attended (row, position) pairs: 4 * head_dim flops each."""
    pairs = sum(q * ctx + q * (q + 1) // 2 for ctx, q in chunks)
    return 4.0 * head_dim * num_heads * pairs


def bench_prefill(bench: Bench) -> list[dict]:
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    num_heads, num_kv_heads, head_dim = 32, 8, 128
    # (cached context, new tokens) per sequence
    cases = ([[(0, 64)]] if bench.smoke else
             [[(0, 4096)], [(0, 2048)] * 4, [(0, 512)] * 16, [(3584, 512)] * 4])
    rows = []
    for chunks in cases:
        rows += _prefill_case(bench, dtype, chunks, num_heads, num_kv_heads, head_dim)
    return rows


def _prefill_case(bench: Bench, dtype: torch.dtype, chunks: list[tuple[int, int]],
                  num_heads: int, num_kv_heads: int, head_dim: int) -> list[dict]:
    rows = []
    seq_lens = [c + q for c, q in chunks]
    query_lens = [q for _, q in chunks]
    key_cache, value_cache, tables, _, _, _ = paged_batch(bench, dtype, num_kv_heads,
                                                          head_dim, seq_lens)
    query = bench.randn(sum(query_lens), num_heads, head_dim, dtype=dtype)
    meta = AttentionMetadata.build(tables[:0, 0], tables, query_lens, seq_lens)
    out = torch.empty_like(query)
    flops = causal_flops(chunks, num_heads, head_dim)
    scale = head_dim ** -0.5
    label = f"{len(chunks)}x(ctx {chunks[0][0]} + {chunks[0][1]})"

    def run(tiles=None):
        return lambda: paged_attention_prefill_triton(
            query, key_cache, value_cache, tables, meta.seq_lens, meta.query_start_loc,
            scale, out=out, max_query_len=max(query_lens), tiles=tiles)

    heads = min(num_heads // num_kv_heads, MAX_TILE_HEADS)  # a program's query heads
    default = prefill_tiles(max(query_lens) * heads, bench.device)
    variants = {f"triton default {default}": run()}
    for tiles in [] if bench.smoke else PREFILL_CANDIDATES:
        if tiles != default:
            variants[f"triton {tiles}"] = run(tiles)
    if all(c == 0 for c, _ in chunks):  # SDPA's causal mask is aligned top-left
        step_kv = tuple(bench.randn(len(query), num_kv_heads, head_dim, dtype=dtype)
                        for _ in range(2))
        variants["triton default, varlen (the step's K/V rows)"] = (
            lambda: paged_attention_prefill_triton(
                query, key_cache, value_cache, tables, meta.seq_lens, meta.query_start_loc,
                scale, out=out, max_query_len=max(query_lens), fresh_kv=step_kv))
        length = chunks[0][1]
        q = query.view(len(chunks), length, num_heads, head_dim).transpose(1, 2)
        k = bench.randn(len(chunks), num_kv_heads, length, head_dim, dtype=dtype)
        v = bench.randn(len(chunks), num_kv_heads, length, head_dim, dtype=dtype)
        variants["sdpa contiguous causal"] = (
            lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True))
    for name, fn in variants.items():
        ms = bench.time_ms(fn)
        rows.append(dict(case=label, variant=name, ms=ms, tflops=flops / ms / 1e9))
        print(f"  prefill {label:<24} {name:<60} {ms:8.3f} ms "
              f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    return rows


def bench_layer_kernels(bench: Bench) -> list[dict]:
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    tokens, hidden, heads, head_dim, inter = ((8, 64, 2, 64, 128) if bench.smoke else
                                              (8192, 4096, 32, 128, 14336))
    x = bench.randn(tokens, hidden, dtype=dtype)
    res = bench.randn(tokens, hidden, dtype=dtype)
    w = bench.randn(hidden, dtype=dtype)
    q = bench.randn(tokens, heads, head_dim, dtype=dtype)
    pos = torch.randint(0, 4096, (tokens,), generator=bench.gen).to(bench.device)
    cos_sin = bench.randn(4096, head_dim)
    gate_up = bench.randn(tokens, 2 * inter, dtype=dtype)
    size = x.element_size()
    cases = {  # name: (triton, torch, bytes moved)
        "rms_norm": (lambda: rms_norm_triton(x, w, 1e-6), lambda: rms_norm(x, w, 1e-6),
                     2 * x.numel() * size),
        "add_rms_norm": (lambda: add_rms_norm_triton(x, res, w, 1e-6),
                         lambda: add_rms_norm(x, res, w, 1e-6), 4 * x.numel() * size),
        "rotary": (lambda: apply_rotary_triton(q, pos, cos_sin),
                   lambda: apply_rotary(q, pos, cos_sin), 2 * q.numel() * size),
        "silu_and_mul": (lambda: silu_and_mul_triton(gate_up), lambda: silu_and_mul(gate_up),
                         1.5 * gate_up.numel() * size),
    }
    rows = []
    for name, (tri, ref, nbytes) in cases.items():
        tri_ms, ref_ms = bench.time_ms(tri), bench.time_ms(ref)
        rows.append(dict(kernel=name, triton_ms=tri_ms, torch_ms=ref_ms,
                         triton_gbps=nbytes / tri_ms / 1e6, speedup=ref_ms / tri_ms))
        print(f"  {name:<14} triton {tri_ms:7.3f} ms ({rows[-1]['triton_gbps']:6.0f} GB/s)  "
              f"torch {ref_ms:7.3f} ms  x{rows[-1]['speedup']:.2f}", flush=True)
    return rows


def bench_quantized_linears(bench: Bench, copy_bw: float) -> list[dict]:
    """Per layer shape and batch: bf16 matmul, the Triton grouped matmul (4-bit values in
    groups of 128, held a byte each and in 4 bits), fp8
    scaled_mm where the card has it; ms, and the weight bytes each streams per ms beside half
    the copy bandwidth (a read's share of it)."""
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    shapes = [(64, 128)] if bench.smoke else [(4096, 4096), (14336, 4096), (4096, 14336)]
    batches = [1, 5] if bench.smoke else [1, 16, 256]
    rows = []
    for n, k in shapes:
        dense = bench.randn(n, k, dtype=dtype)
        grouped = grouped_on_device(bench, n, k, 128)
        narrow = pack_quantized_triton(grouped)
        fp8 = quantize_fp8(dense) if fp8_supported(bench.device) else None
        for batch in batches:
            x = bench.randn(batch, k, dtype=dtype)
            cases = {"bf16 matmul": (partial(torch.matmul, x, dense.T),
                                     dense.numel() * dense.element_size()),
                     "triton grouped (values 1 byte)": (
                         partial(quantized_linear_triton, x, grouped, None), grouped.nbytes),
                     "triton grouped (values 4 bits)": (
                         partial(quantized_linear_triton, x, narrow, None), narrow.nbytes)}
            if fp8 is not None:
                cases["fp8 scaled_mm"] = (partial(fp8_linear, x, fp8, None), fp8.nbytes)
            for name, (fn, nbytes) in cases.items():
                ms = bench.time_ms(fn)
                rows.append(dict(kernel=name, n=n, k=k, batch=batch, ms=ms,
                                 weight_gbps=nbytes / ms / 1e6,
                                 read_bound_share=nbytes / ms / 1e6 / (copy_bw / 2e9)))
                print(f"  {name:<32} {n}x{k} batch {batch:<4} {ms:8.3f} ms  weights "
                      f"{rows[-1]['weight_gbps']:6.0f} GB/s", flush=True)
    return rows


def moe_inputs(bench: Bench, dtype: torch.dtype, tokens: int, experts: int, top_k: int,
               hidden: int, intermediate: int):
    x = bench.randn(tokens, hidden, dtype=dtype)
    w13 = bench.randn(experts, 2 * intermediate, hidden, dtype=dtype, scale=hidden ** -0.5)
    w2 = bench.randn(experts, hidden, intermediate, dtype=dtype, scale=intermediate ** -0.5)
    weights, ids = bench.randn(tokens, experts).softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, weights, ids


def check_moe(bench: Bench, dtype: torch.dtype) -> None:
    shapes = [(5, 4, 2, 64, 48), (70, 8, 2, 64, 96)] if bench.smoke else [
        (3, 8, 2, 4096, 1024), (700, 8, 2, 4096, 1024), (300, 64, 8, 2048, 768)]
    for tokens, experts, top_k, hidden, inter in shapes:
        args = moe_inputs(bench, dtype, tokens, experts, top_k, hidden, inter)
        bench.check(f"fused_moe tokens={tokens} experts={experts} top_k={top_k}", dtype,
                    fused_moe_triton(*args, silu_and_mul_triton), fused_moe(*args, silu_and_mul))


def bench_moe(bench: Bench, copy_bw: float) -> list[dict]:
    """A Mixtral-8x7B-shaped MoE layer (8 experts of 14336, top 2, hidden 4096) and a
    Qwen3-30B-A3B-shaped one (128 experts of 768, top 8, hidden 2048): the Triton grouped GEMM
    against the PyTorch loop over experts, ms per call, and for decode batches the bytes of
    the experts read (those hit) per ms."""
    dtype = torch.bfloat16 if bench.device.type == "cuda" else torch.float32
    shapes = {"tiny": (4, 2, 64, 48)} if bench.smoke else {
        "mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}
    batches = [1, 6] if bench.smoke else [1, 16, 64, 512]
    rows = []
    for name, (experts, top_k, hidden, inter) in shapes.items():
        for tokens in batches:
            x, w13, w2, weights, ids = moe_inputs(bench, dtype, tokens, experts, top_k, hidden,
                                                  inter)
            hit = int(ids.unique().numel())
            nbytes = hit * (w13[0].numel() + w2[0].numel()) * w13.element_size()
            for variant, fn in (("triton grouped", partial(fused_moe_triton, x, w13, w2,
                                                             weights, ids, silu_and_mul_triton)),
                                ("torch loop", partial(fused_moe, x, w13, w2, weights, ids,
                                                       silu_and_mul))):
                ms = bench.time_ms(fn)
                rows.append(dict(shape=name, variant=variant, tokens=tokens, ms=ms,
                                 experts_hit=hit, weight_gbps=nbytes / ms / 1e6,
                                 read_bound_share=nbytes / ms / 1e6 / (copy_bw / 2e9)))
                print(f"  moe {name:<14} {variant:<15} tokens {tokens:<4} {ms:8.3f} ms  "
                      f"experts read {rows[-1]['weight_gbps']:6.0f} GB/s", flush=True)
            del x, w13, w2
    return rows


E2E_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                 max_position_embeddings=2048)


def end_to_end(bench: Bench) -> dict:
    """The executor's own bootstrap (the offline engine) on a random LLaMA with each kernel set,
    each run in a process of its own (so each profiles the GPU's memory from a clean start)."""
    from pagedserve.testing.tiny_models import save_tiny_llama

    directory = save_tiny_llama(pathlib.Path(tempfile.mkdtemp()) / "llama",
                                **({} if bench.smoke else E2E_LLAMA))
    dtypes = ("float32",) if bench.smoke else ("float32", "bfloat16")
    result: dict[str, object] = {}
    tokens = {}
    for dtype in dtypes:
        for backend in ("torch", "triton"):
            command = [sys.executable, __file__, "--e2e-run", str(directory), dtype, backend]
            if bench.smoke:
                command.append("--smoke")
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"end-to-end run {dtype} {backend} failed:\n{done.stderr}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            tokens[dtype, backend] = run["tokens"]
            result[f"{dtype} {backend} output tok/s"] = run["tok_s"]
            bench.checks.append(Check(f"end to end seeded sampling reproducible, {backend}",
                                      dtype, 0.0, 0.0, run["seeded_reproducible"]))
            print(f"  e2e {dtype:<9} {backend:<7} {run['tok_s']:9.1f} output tok/s", flush=True)
    for dtype in dtypes:
        pairs = [(a, b) for ta, tb in zip(tokens[dtype, "torch"], tokens[dtype, "triton"],
                                          strict=True) for a, b in zip(ta, tb, strict=True)]
        agree = sum(a == b for a, b in pairs) / len(pairs)
        result[f"{dtype} greedy tokens equal"] = agree == 1.0
        result[f"{dtype} token agreement"] = agree
        print(f"  e2e {dtype}: greedy tokens triton == torch: {agree == 1.0} ({agree:.1%} "
              "agree)", flush=True)
    # float32 is the strict check; bf16 rounding may flip near-ties of random weights, and a
    # flip changes the rest of that sequence, so bf16 (what a GPU serves) is held to its first
    # tokens: Triton's interpreter cannot check bf16 at all, so this is its only end-to-end check.
    bench.checks.append(Check("end to end greedy tokens, triton == torch", "float32", 0.0, 0.0,
                              bool(result["float32 greedy tokens equal"])))
    if "bfloat16" in dtypes:
        first = [a[0] == b[0] for a, b in zip(tokens["bfloat16", "torch"],
                                              tokens["bfloat16", "triton"], strict=True)]
        disagree = 1 - sum(first) / len(first)
        result["bfloat16 first token agreement"] = 1 - disagree
        bench.checks.append(Check(
            "end to end first tokens, triton == torch (share differing)", "bfloat16", disagree,
            BF16_FIRST_TOKEN_DISAGREEMENT, disagree <= BF16_FIRST_TOKEN_DISAGREEMENT))
    return result


def e2e_run(directory: str, dtype: str, backend: str, smoke: bool) -> None:
    """One end-to-end configuration; prints {"tokens", "tok_s"} as the last line."""
    from pagedserve.entrypoints.offline import LLM
    from pagedserve.v1.common_pb2 import SamplingParams

    num_prompts, prompt_len, max_tokens = (2, 5, 4) if smoke else (64, 256, 128)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (prompt_len,), generator=gen).tolist()
               for _ in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm = LLM(directory, device="cpu" if smoke else "cuda", dtype=dtype,
              attention_backend=backend, kv_cache_gib=0.05, gpu_memory_utilization=0.3,
              max_model_len=None if smoke else 1024)
    # Warm-up on the same batch: compiles every kernel variant the timed run meets (with two
    # prompts, a cold Triton cache compiled the rest inside the timed run: 530 vs 5,400 tok/s).
    llm.generate(prompts, params)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    # Seeded sampling twice: each seeded row draws from a generator on the logits' device, so
    # the runs must agree token for token (a generator on the wrong device fails here).
    seeded = [SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(min(8, num_prompts))]
    draws = [[list(o.outputs[0].token_ids) for o in llm.generate(prompts[:len(seeded)], seeded)]
             for _ in range(2)]
    print(json.dumps(dict(tokens=[list(o.outputs[0].token_ids) for o in outs],
                          tok_s=num_prompts * max_tokens / seconds,
                          seeded_reproducible=draws[0] == draws[1])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU under Triton's interpreter")
    parser.add_argument("--json", type=pathlib.Path, help="write every figure here")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                        "checks,decode,prefill,layers,quantized,moe,e2e")
    parser.add_argument("--e2e-run", nargs=3, metavar=("MODEL_DIR", "DTYPE", "BACKEND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.e2e_run:
        e2e_run(*args.e2e_run, smoke=args.smoke)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.smoke else "cuda")
    bench = Bench(device, args.smoke)
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__)
    print(info, flush=True)
    bench.results["info"] = info
    if "checks" not in skip:
        print("correctness against the PyTorch path:", flush=True)
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if not args.smoke else [])
        for dtype in dtypes:
            check_attention(bench, dtype)
            check_layer_kernels(bench, dtype)
            check_quantized_linears(bench, dtype)
            check_moe(bench, dtype)
    copy_bw = copy_bandwidth(bench)
    bench.results["copy_bandwidth_gbps"] = copy_bw / 1e9
    print(f"device copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s", flush=True)
    if "decode" not in skip:
        bench.results["decode"] = bench_decode(bench, copy_bw)
    if "prefill" not in skip:
        bench.results["prefill"] = bench_prefill(bench)
    if "layers" not in skip:
        bench.results["layer_kernels"] = bench_layer_kernels(bench)
    if "quantized" not in skip:
        bench.results["quantized_linears"] = bench_quantized_linears(bench, copy_bw)
    if "moe" not in skip:
        bench.results["moe"] = bench_moe(bench, copy_bw)
    if "e2e" not in skip:
        bench.results["end_to_end"] = end_to_end(bench)
    bench.results["checks"] = [asdict(c) for c in bench.checks]
    failed = [c for c in bench.checks if not c.passed]
    print(f"{len(bench.checks) - len(failed)} of {len(bench.checks)} checks passed", flush=True)
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
