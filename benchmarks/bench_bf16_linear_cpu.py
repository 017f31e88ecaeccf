"""bfloat16 matmuls on the CPU as a decode step meets them: the default model's (SmolLM2-135M)
linear layers of one step, through 30 layers' distinct weights (so that, as in the model, each
layer's weights come from memory, not from a cache the previous call warmed), per variant,
alternated round by round:
- ours: kernels/pagedserve/kernels/csrc/bf16_linear.c (`pack_linear_cpu` on AVX-512 BF16 CPUs,
  what the engine's cpu kernel set runs for a bfloat16 model);
- oneDNN: the weight in oneDNN's blocked layout and PyTorch's mkldnn linear (what it ran before);
- F.linear: on the plain weight.

    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \\
        .venv/bin/python benchmarks/bench_bf16_linear_cpu.py [--batch 1 8 32 64 256] [--json out]

Each figure is the median over rounds of one step's linears (the LM head once), with the GFLOP/s
that makes and the worst error of a variant's outputs against float64, relative to the largest
output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from linear_steps import LM_HEAD, NUM_LAYERS

from pagedserve.kernels import cpu_kernels

# q, k and v as the engine packs them (one matmul), o, gate and up (one), down.
FUSED_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def variants(weight: torch.Tensor) -> dict:
    ours = cpu_kernels.pack_linear_cpu(weight)
    assert isinstance(ours, cpu_kernels.PackedBf16Weight), "needs AVX-512 BF16"
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    return {"ours": lambda x: cpu_kernels.packed_linear_cpu(x, ours, None),
            "oneDNN": lambda x: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [],
                                                                  ""),
            "F.linear": lambda x: F.linear(x, weight)}


def measure(batch: int, rounds: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = FUSED_SHAPES * NUM_LAYERS + [LM_HEAD]  # every call of a step, in the model's order
    calls = []  # (variants, x, weight)
    for n, k in shapes:
        weight = (torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16()
        calls.append((variants(weight), torch.randn(batch, k, generator=gen).bfloat16(), weight))
    names = list(calls[0][0])
    errors = {name: 0.0 for name in names}
    for fns, x, weight in calls[:len(FUSED_SHAPES)] + calls[-1:]:  # one layer and the head
        exact = x.double() @ weight.double().T
        for name, fn in fns.items():
            errors[name] = max(errors[name], ((fn(x).double() - exact).abs().max()
                                              / exact.abs().max()).item())
    times = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # the first round warms up
            for name in (names if round_ % 2 else names[::-1]):
                start = time.perf_counter()
                for fns, x, _ in calls:
                    fns[name](x)
                if round_:
                    times[name].append(time.perf_counter() - start)
    flop = 2 * batch * sum(n * k for n, k in shapes)
    return {name: {"step_ms": round(statistics.median(t) * 1e3, 2),
                   "gflops": round(flop / statistics.median(t) / 1e9, 1),
                   "max_rel_err": errors[name]} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batches": {}}
    for batch in args.batch:
        figures = results["batches"][batch] = measure(batch, args.rounds)
        print(f"batch {batch}: " + ", ".join(
            f"{name} {f['step_ms']} ms ({f['gflops']} GFLOP/s, err {f['max_rel_err']:.1e})"
            for name, f in figures.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
