"""GGUF's 4-, 5- and 6-bit values packed in 4, 5 and 6 bits against a byte each (issue 19): the
default model's (SmolLM2-135M) linear layers of one decode step as grouped weights of each
width, the same values in both layouts, alternated round by round in one process, beside
bf16's packed matmul (what a bf16 model runs).

    python benchmarks/bench_grouped_bits_cpu.py [--batch 1 4 16 64] [--rounds 15] [--json out.json]

Widths, as gguf_blocks.py unpacks the formats (random values over the width's whole range;
float32 factors, as the K formats' folded ones are):
- Q4_1: values 0..15, groups of 32, a scale and an offset per group (the default model's
  format; its factors are float16 in the file, float32 here);
- Q5_K: values 0..31, groups of 32, a scale and an offset per group;
- Q6_K: values -32..31, groups of 16, a scale per group.
4-bit values also as GGUF's weights are served, `int16_activations` (by x rounded to 16-bit
integers per group, where the kernels do: AVX2 CPUs, up to 8 rows).
Each figure is the median over rounds of the summed time of every linear layer of one step (30
layers of q, k, v, o, gate, up, down; the LM head once), with the bytes those weights take and
the largest error of any layer's output against a float64 product of the dequantized weights.
"""

from __future__ import annotations

import dataclasses
import functools

import linear_steps
import torch
from linear_steps import alternated_step_ms, engine_bf16_linear, step_shapes

from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.quantization import GroupedWeight, value_bits

# Format -> (values' range, group size, offsets).
WIDTHS = {"Q4_1": ((0, 15), 32, True), "Q5_K": ((0, 31), 32, True),
          "Q6_K": ((-32, 31), 16, False)}


def random_weight(n: int, k: int, fmt: str, gen: torch.Generator,
                  half_factors: bool = False) -> GroupedWeight:
    """Random values of `fmt`'s range; factors float16 values where `half_factors` (as Q4_0,
    Q4_1, Q5_0, Q5_1 and Q8_0 store them: the kernels then read 2 bytes a factor)."""
    (low, high), group, offsets = WIDTHS[fmt]
    factors = [torch.rand(n, k // group, generator=gen) / (16 * k ** 0.5),
               torch.randn(n, k // group, generator=gen) / k if offsets else None]
    if half_factors:
        factors = [None if f is None else f.half().float() for f in factors]
    return GroupedWeight(torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8),
                         *factors)


def variants(n: int, k: int, gen: torch.Generator) -> tuple[dict, dict]:
    """Each variant's (callable on bf16 activations, weight bytes, format), and each format's
    float64 dequantization."""
    fns, dequantized = {}, {}
    for fmt in WIDTHS:
        weight = random_weight(n, k, fmt, gen)
        dequantized[fmt] = weight.dequantized(torch.float64)
        packed = {f"{fmt} in {bits} bits": cpu_kernels.pack_grouped_cpu(weight, bits)
                  for bits in (value_bits(weight.qweight), 8)}
        if value_bits(weight.qweight) == 4:  # GGUF's, by 16-bit activations where the CPU does
            packed[f"{fmt} by 16-bit x"] = cpu_kernels.pack_grouped_cpu(
                dataclasses.replace(weight, int16_activations=True))
        for name, p in packed.items():
            fns[name] = (functools.partial(cpu_kernels.quantized_linear_cpu, weight=p, bias=None),
                         p.nbytes, fmt)
    fns["bf16 packed"] = (*engine_bf16_linear(dequantized["Q6_K"].bfloat16()), "Q6_K")
    return fns, dequantized


def measure(batch: int, rounds: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    layers, errors, weight_bytes = [], [], {}
    for n, k, count in step_shapes():
        fns, dequantized = variants(n, k, gen)
        x = torch.randn(batch, k, generator=gen).bfloat16()
        errors.append({})
        for name, (fn, nbytes, fmt) in fns.items():
            reference = x.double() @ dequantized[fmt].T
            errors[-1][name] = ((fn(x).double() - reference).abs().max()
                                / reference.abs().max()).item()
            weight_bytes[name] = weight_bytes.get(name, 0) + nbytes * count
        layers.append(({name: functools.partial(fn, x) for name, (fn, _, _) in fns.items()},
                       count))
    return {name: {"step_ms": ms, "weight_bytes": weight_bytes[name],
                   "max_rel_err": max(e[name] for e in errors)}
            for name, ms in alternated_step_ms(layers, rounds).items()}


def main() -> None:
    linear_steps.main(__doc__.split("\n\n")[0], measure, [1, 4, 16, 64],
                      lambda f: f"{f['weight_bytes'] / 1e6:7.1f} MB")


if __name__ == "__main__":
    main()
