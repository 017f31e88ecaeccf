"""The CPU decode-attention kernel alone, by KV cache dtype: milliseconds for one decode step's
attention over every layer of the default model's shape (9 query heads, 3 KV heads, head_dim 64,
bfloat16 queries, or float32 ones with `--dtype float32`: the model's dtype on CPUs without
AVX-512), each layer its own random cache, so that the caches stream from memory as in serving
(30 layers at batch 64 and context 1024: 1.5 GB of bfloat16 cache a step). `auto` is a cache
of the queries' dtype.

    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \\
        .venv/bin/python benchmarks/bench_decode_attention_cpu.py \\
        [--batch 64] [--context 1024] [--layers 30] [--repeats 7] [--dtype bfloat16] \\
        [--kv-cache-dtype auto fp8_e4m3 fp8_e5m2]

Contexts spread by +-20 around `--context`, contiguous block tables, blocks of 16. The dtypes
are timed alternately, round by round, and reported as medians, each against the first.
`--batch 8 --layers 1 --passes 240` runs the same work over one layer's caches, which then
stay in the CPU's caches: the kernel's arithmetic without the wait for memory.
"""

import argparse
import statistics
import time

import torch

from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.attention import FP8_DTYPES

HEADS, KV_HEADS, HEAD_DIM, BLOCK, SCALE = 9, 3, 64, 16, 0.125


def attention_inputs(batch: int, context: int, layers: int, query_dtype: torch.dtype,
                     kv_cache_dtypes: list[str], seed: int = 0) -> tuple:
    """A decode step's queries, block tables, lengths and, for each cache dtype, `layers`
    layers' (K, V) caches: contexts spread by +-20 around `context`, contiguous tables."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = (context + 20) // BLOCK + 2
    tables = torch.arange(batch * blocks_per_seq).view(batch, blocks_per_seq)
    lens = torch.tensor([context + i % 41 - 20 for i in range(batch)])
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=generator).to(query_dtype)
    caches = {}
    for name in kv_cache_dtypes:
        dtype = FP8_DTYPES.get(name, query_dtype)
        shape = (batch * blocks_per_seq, BLOCK, KV_HEADS, HEAD_DIM)
        caches[name] = [tuple(torch.randn(shape, generator=generator).to(dtype) for _ in "kv")
                        for _ in range(layers)]
    return query, tables, lens, caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--passes", type=int, default=1, help="times over the layers a round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds; medians kept")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "fp8_e4m3"],
                        choices=["auto", *FP8_DTYPES])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the queries' dtype (and an `auto` cache's)")
    args = parser.parse_args()
    query_dtype = getattr(torch, args.dtype)

    query, tables, lens, caches = attention_inputs(args.batch, args.context, args.layers,
                                                   query_dtype, args.kv_cache_dtype)
    out = torch.empty_like(query)
    times = {name: [] for name in caches}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name in list(caches) if round_index % 2 else list(caches)[::-1]:
            start = time.perf_counter()
            for key_cache, value_cache in caches[name] * args.passes:
                cpu_kernels.paged_decode_attention_cpu(query, key_cache, value_cache, tables,
                                                       lens, SCALE, out=out)
            if round_index:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[args.kv_cache_dtype[0]])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"kv {name}, {args.dtype} queries, batch {args.batch}, context ~{args.context}, "
              f"{args.layers} layers x {args.passes}: {median * 1e3:.3g} ms "
              f"({median / base:.2f}x), threads "
              f"{torch.get_num_threads()}, rounds {[round(t * 1e3, 1) for t in runs]}")


if __name__ == "__main__":
    main()
