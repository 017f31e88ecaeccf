"""Which int8 matmul PyTorch already gives on CPU is fastest for weight-only int8 (issue 19):
the default model's (SmolLM2-135M) linear layers of one decode step, per variant, alternated
round by round in one process, each against bf16's F.linear (what the engine runs today).

    python benchmarks/bench_int8_cpu.py [--batch 1 16 64] [--rounds 15] [--json out.json]

Variants, all with per-output-channel symmetric int8 weights (W8A16 unless said):
- bf16 / fp32: F.linear on float weights (the baseline, and the float32 path);
- int8pack bf16 / fp32: aten._weight_int8pack_mm (int8 weights, float activations, the scale
  applied to the output; what gpt-fast's int8 mode runs);
- dynamic W8A8: torch.ao's dynamically quantized Linear (fbgemm / oneDNN: activations quantized
  per step to int8 too; a different accuracy class, timed for comparison);
- bf16 packed: the bf16 weight as `pack_linear_cpu` packs it, what the engine's cpu kernel set
  runs for a bf16 model (for bf16_linear.c on AVX-512 BF16 CPUs since 2026-12-06; oneDNN's
  blocked layout before that, and elsewhere; unpacked, F.linear, on CPUs with no bf16 path);
- C W8A16 / C W8A8: pagedserve's own int8 kernel (kernels/pagedserve/kernels/csrc/int8_linear.c),
  what `--quantization int8` / `w8a8_int8` run on the CPU.

Each figure is the median over rounds of the summed time of every linear layer of one step
(30 layers of q, k, v, o, gate, up, down; the LM head once), plus the max error of each
variant's layer outputs against a float64 reference on the dequantized weights.
"""

from __future__ import annotations

import functools

import linear_steps
import torch
import torch.nn.functional as F
from linear_steps import alternated_step_ms, engine_bf16_linear, step_shapes

from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.quantization import Int8Weight, quantize_int8


def variants(weight: torch.Tensor) -> dict[str, tuple]:
    """Each variant's callable on activations x (float32 [M, K]) and the dtype it takes."""
    weight_int8 = quantize_int8(weight, dynamic_activations=False)  # what --quantization makes
    q, scale = weight_int8.qweight, weight_int8.scales
    dequantized = q.float() * scale[:, None]
    bf16_w, fp32_w = dequantized.bfloat16(), dequantized
    scale_bf16 = scale.bfloat16()
    dynamic = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0],
                                                   bias_=False, dtype=torch.qint8)
    dynamic.set_weight_bias(torch.quantize_per_channel(
        dequantized, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
        torch.qint8), None)
    w8a16, w8a8 = (cpu_kernels.pack_int8_cpu(Int8Weight(q, scale, dynamic_activations))
                   for dynamic_activations in (False, True))
    return {
        "bf16": (lambda x: F.linear(x, bf16_w), torch.bfloat16),
        "bf16 packed": (engine_bf16_linear(bf16_w)[0], torch.bfloat16),
        "C W8A16": (lambda x: cpu_kernels.int8_linear_cpu(x, w8a16, None), torch.bfloat16),
        "C W8A8": (lambda x: cpu_kernels.int8_linear_cpu(x, w8a8, None), torch.bfloat16),
        "fp32": (lambda x: F.linear(x, fp32_w), torch.float32),
        "int8pack bf16": (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale_bf16),
                          torch.bfloat16),
        "int8pack fp32": (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale),
                          torch.float32),
        "dynamic W8A8": (dynamic, torch.float32),
    }, dequantized


def measure(batch: int, rounds: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    layers, errors = [], []
    for n, k, count in step_shapes():
        weight = torch.randn(n, k, generator=gen) / k ** 0.5
        fns, dequantized = variants(weight)
        x = torch.randn(batch, k, generator=gen)
        reference = x.double() @ dequantized.double().T
        errors.append({name: ((fn(x.to(dtype)).double() - reference).abs().max()
                               / reference.abs().max()).item()
                       for name, (fn, dtype) in fns.items()})
        inputs = {dtype: x.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
        layers.append(({name: functools.partial(fn, inputs[dtype])
                        for name, (fn, dtype) in fns.items()}, count))
    step_ms = alternated_step_ms(layers, rounds)
    return {name: {"step_ms": ms, "vs_bf16": ms / step_ms["bf16"],
                   "max_rel_err": max(e[name] for e in errors)}
            for name, ms in step_ms.items()}


def main() -> None:
    linear_steps.main(__doc__.split("\n\n")[0], measure, [1, 16, 64],
                      lambda f: f"{f['vs_bf16']:5.2f}x bf16")


if __name__ == "__main__":
    main()
