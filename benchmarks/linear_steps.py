"""The default model's (SmolLM2-135M) linear layers of one decode step, timed variant against
variant in one process: what benchmarks/bench_int8_cpu.py and bench_grouped_bits_cpu.py share."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from pagedserve.kernels import cpu_kernels

# SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, intermediate 1536, vocabulary 49152.
LAYER_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
NUM_LAYERS = 30
LM_HEAD = (49152, 576)


def step_shapes() -> list[tuple[int, int, int]]:
    """(out features, in features, times per step) of every linear layer of a step."""
    return [(n, k, NUM_LAYERS) for n, k in LAYER_SHAPES.values()] + [(*LM_HEAD, 1)]


def engine_bf16_linear(weight: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                       int]:
    """What the engine's cpu kernel set runs for a bf16 Linear, and the bytes its weight takes:
    the weight as `pack_linear_cpu` packs it, or the plain weight through F.linear where this
    CPU has no bf16 packing (AVX2)."""
    packed = cpu_kernels.pack_linear_cpu(weight)
    if packed is None:
        return (lambda x: F.linear(x, weight)), weight.nbytes
    return (lambda x: cpu_kernels.packed_linear_cpu(x, packed, None)), packed.nbytes


def alternated_step_ms(layers: Sequence[tuple[dict[str, Callable[[], object]], int]],
                       rounds: int) -> dict[str, float]:
    """Each variant's median over `rounds` (after two warm-up rounds) of the summed time of
    one step: every layer's call for it, `count` times, for (calls by variant, count) in
    `layers`. The variants take turns within a round, in an order that reverses each round."""
    names = list(layers[0][0])
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for round_ in range(rounds + 2):
            for name in (names if round_ % 2 else names[::-1]):
                total = 0.0
                for calls, count in layers:
                    call = calls[name]
                    start = time.perf_counter()
                    for _ in range(count):
                        call()
                    total += time.perf_counter() - start
                if round_ >= 2:
                    times[name].append(total)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(description: str, measure: Callable[[int, int], dict[str, dict]],
         default_batches: list[int], columns: Callable[[dict], str]) -> None:
    """A benchmark's command line: `measure(batch, rounds)` for each --batch, each variant's
    figures printed (`columns` of them after the step time) and written to --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, nargs="+", default=default_batches)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "batches": {}}
    for batch in args.batch:
        figures = measure(batch, args.rounds)
        results["batches"][batch] = figures
        for name, f in figures.items():
            print(f"batch {batch:3}  {name:16} {f['step_ms']:8.2f} ms/step  {columns(f)}  "
                  f"max rel err {f['max_rel_err']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
