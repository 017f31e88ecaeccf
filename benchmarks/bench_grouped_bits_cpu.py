"""5- and 6-bit GGUF values packed in 5 and 6 bits against a byte each (issue 19): the default
model's (SmolLM2-135M) linear layers of one decode step as grouped weights of each width, the
same values in both layouts, alternated round by round in one process, beside bf16's packed
matmul (what a bf16 model runs).

    python benchmarks/bench_grouped_bits_cpu.py [--batch 1 4 16 64] [--rounds 15] [--json out.json]

Widths, as gguf_blocks.py unpacks the formats (random values over the width's whole range;
float32 factors, as the K formats' folded ones are):
- Q5_K: values 0..31, groups of 32, a scale and an offset per group;
- Q6_K: values -32..31, groups of 16, a scale per group.
Each figure is the median over rounds of the summed time of every linear layer of one step (30
layers of q, k, v, o, gate, up, down; the LM head once), with the bytes those weights take and
the largest error of any layer's output against a float64 product of the dequantized weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.quantization import GroupedWeight

# SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, intermediate 1536, vocabulary 49152.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                (576, 1536)]
NUM_LAYERS = 30
LM_HEAD = (49152, 576)
# Format -> (values' range, group size, offsets).
WIDTHS = {"Q5_K": ((0, 31), 32, True), "Q6_K": ((-32, 31), 16, False)}


def random_weight(n: int, k: int, fmt: str, gen: torch.Generator) -> GroupedWeight:
    (low, high), group, offsets = WIDTHS[fmt]
    return GroupedWeight(torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8),
                         torch.rand(n, k // group, generator=gen) / (16 * k ** 0.5),
                         torch.randn(n, k // group, generator=gen) / k if offsets else None)


def variants(n: int, k: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Each variant's callable on bf16 activations, and its weight's float64 dequantization."""
    fns, dequantized = {}, {}
    for fmt in WIDTHS:
        weight = random_weight(n, k, fmt, gen)
        dequantized[fmt] = weight.dequantized(torch.float64)
        for bits in (cpu_kernels.value_bits(weight.qweight), 8):
            packed = cpu_kernels.pack_grouped_cpu(weight, bits)
            fns[f"{fmt} in {bits} bits"] = (packed, fmt)
    bf16 = cpu_kernels.pack_linear_cpu(dequantized["Q6_K"].bfloat16())
    fns["bf16 packed"] = (bf16, "Q6_K")
    return fns, dequantized


def run(weight, x: torch.Tensor) -> torch.Tensor:
    if isinstance(weight, cpu_kernels.PackedGroupedWeight):
        return cpu_kernels.quantized_linear_cpu(x, weight, None)
    return cpu_kernels.packed_linear_cpu(x, weight, None)


def nbytes(weight) -> int:
    return weight.nbytes if isinstance(weight, cpu_kernels.PackedGroupedWeight) \
        else weight.numel() * weight.element_size()


def measure(batch: int, rounds: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for n, k in [*LAYER_SHAPES, LM_HEAD]:
        fns, dequantized = variants(n, k, gen)
        x = torch.randn(batch, k, generator=gen).bfloat16()
        errors = {}
        for name, (weight, fmt) in fns.items():
            reference = x.double() @ dequantized[fmt].T
            errors[name] = ((run(weight, x).double() - reference).abs().max()
                            / reference.abs().max()).item()
        layers.append((fns, x, errors))
    counts = [NUM_LAYERS] * len(LAYER_SHAPES) + [1]
    names = list(layers[0][0])
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(rounds + 2):  # two warm-up rounds
            for name in (names if round_ % 2 else names[::-1]):  # alternate the order
                total = 0.0
                for (fns, x, _), count in zip(layers, counts, strict=True):
                    weight = fns[name][0]
                    start = time.perf_counter()
                    for _ in range(count):
                        run(weight, x)
                    total += time.perf_counter() - start
                if round_ >= 2:
                    times[name].append(total)
    return {name: {"step_ms": statistics.median(times[name]) * 1e3,
                   "weight_bytes": sum(nbytes(fns[name][0]) * count
                                       for (fns, _, _), count in zip(layers, counts,
                                                                     strict=True)),
                   "max_rel_err": max(errors[name] for _, _, errors in layers)}
            for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batches": {}}
    for batch in args.batch:
        figures = measure(batch, args.rounds)
        results["batches"][batch] = figures
        for name, f in figures.items():
            print(f"batch {batch:3}  {name:16} {f['step_ms']:8.2f} ms/step  "
                  f"{f['weight_bytes'] / 1e6:7.1f} MB  max rel err {f['max_rel_err']:.1e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
