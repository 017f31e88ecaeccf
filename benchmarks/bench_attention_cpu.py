"""The CPU attention kernels alone (`paged_attention_cpu`), bfloat16, the default model's attention
shape (9 query heads, 3 KV heads, head_dim 64), caches hot: milliseconds a layer, GFLOP/s, and
the error against a float64 reference beside the error of rounding that reference to bfloat16.

    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \\
        .venv/bin/python benchmarks/bench_attention_cpu.py [--cases prefill2048 decode32x250]

Cases: one 2048-token prompt; four 512-token prompts; 32 decodes at a context of 250; 8 decodes
at 1000. A case's FLOPs count 2 per multiply-add of q.K and P.V over the positions each query
attends (half the square for a prompt).
"""

import argparse
import json
import statistics
import time

import torch

from pagedserve.kernels import cpu_kernels as cpu
from pagedserve.kernels.attention import paged_attention
from pagedserve.testing import paged_batches

HEADS, KV_HEADS, HEAD_DIM, SCALE = 9, 3, 64, 0.125
# name: (decode context lengths, prompts as (cached context, new tokens))
CASES = {
    "prefill2048": ([], [(0, 2048)]),
    "prefill4x512": ([], [(0, 512)] * 4),
    "decode32x250": ([250] * 32, []),
    "decode8x1000": ([1000] * 8, []),
}


def batch(decodes, prompts, seed=0):
    """Caches (unwritten slots zero), the query and the metadata of one case."""
    blocks = sum(-(-n // paged_batches.BLOCK) for n in decodes + [c + t for c, t in prompts])
    key_cache, value_cache, query, meta = paged_batches.mixed_batch(
        torch.Generator().manual_seed(seed), torch.bfloat16, HEADS, KV_HEADS, HEAD_DIM, decodes,
        prompts, num_blocks=blocks + 2)
    return key_cache.nan_to_num(0), value_cache.nan_to_num(0), query, meta


def flops(decodes, prompts):
    pairs = sum(decodes) + sum(c * t + t * (t + 1) // 2 for c, t in prompts)
    return 4 * HEADS * HEAD_DIM * pairs


def errors(key_cache, value_cache, query, meta):
    """Max and mean absolute error of the kernel against float64, and of float64 rounded to
    bfloat16 (the floor a bfloat16 output cannot go under)."""
    out = cpu.paged_attention_cpu(query, key_cache, value_cache, meta, SCALE).double()
    ref = paged_attention(query.double(), key_cache.double(), value_cache.double(), meta, SCALE)
    error, floor = (out - ref).abs(), (ref.to(torch.bfloat16).double() - ref).abs()
    return {"max_error": error.max().item(), "mean_error": error.mean().item(),
            "bf16_floor_max": floor.max().item(), "bf16_floor_mean": floor.mean().item()}


def run_case(name, repeats, calls):
    decodes, prompts = CASES[name]
    key_cache, value_cache, query, meta = batch(decodes, prompts)
    cpu.paged_attention_cpu(query, key_cache, value_cache, meta, SCALE)  # build, warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            cpu.paged_attention_cpu(query, key_cache, value_cache, meta, SCALE)
        times.append((time.perf_counter() - start) / calls)
    ms = statistics.median(times) * 1e3
    return {"case": name, "ms_per_layer": round(ms, 4),
            "gflops": round(flops(decodes, prompts) / ms / 1e6, 1),
            **errors(key_cache, value_cache, query, meta)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is kept")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for name in args.cases:
        calls = 3 if name.startswith("prefill") else 100
        result = run_case(name, args.repeats, calls)
        results.append(result)
        print(f"{name}: {result['ms_per_layer']:.3f} ms a layer, {result['gflops']} GFLOP/s, "
              f"error max {result['max_error']:.2e} mean {result['mean_error']:.2e} "
              f"(bf16 rounding: {result['bf16_floor_max']:.2e}, "
              f"{result['bf16_floor_mean']:.2e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
