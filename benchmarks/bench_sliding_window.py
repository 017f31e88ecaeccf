"""Sliding-window memory (issue 22): sequences per GiB of KV cache on a long-generation workload
with Mistral-7B-style windows, the blocks behind the window released while a sequence runs
(the scheduler's default where every layer is windowed) against every block kept.

KV memory is block accounting (blocks held x bytes per block), so no model runs: the production
StepScheduler and BlockManager plan every step of the workload, and bench_scheduler.py's fake
executor answers each plan at once (one token per sequence that computes its last known one).

Workload (defaults): 32 requests arriving at once, prompts of 512 tokens, 8192 output tokens
each (ignore_eos), on a pool of 16 GiB of Mistral-7B blocks (32 layers x K and V x 8 KV heads x
128 x 2 bytes x 16 tokens = 2 MiB a block), window 4096 (Mistral 7B v0.1's), 8192 tokens and
256 sequences a step. Reported per mode: the most blocks one sequence held, as GiB, and
sequences per GiB (its inverse); the most sequences running at once on the pool; preemptions;
steps to finish the workload.

    .venv/bin/python benchmarks/bench_sliding_window.py [--json out.json]
    .venv/bin/python benchmarks/bench_sliding_window.py --quick   # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from bench_scheduler import FakeExecutor

from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.sequence import Request
from pagedserve.scheduler.step_scheduler import StepLimits, StepScheduler
from pagedserve.v1 import common_pb2

BLOCK_SIZE = 16
BLOCK_BYTES = 32 * 2 * 8 * 128 * 2 * BLOCK_SIZE  # Mistral 7B, bfloat16
GIB = 2 ** 30


def run(window: int | None, args: argparse.Namespace) -> dict:
    num_blocks = int(args.pool_gib * GIB // BLOCK_BYTES)
    max_model_len = args.prompt + args.output
    blocks = BlockManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=False,
                          sliding_window=window)
    scheduler = StepScheduler(blocks, StepLimits(256, 8192, max_model_len), eos_token_ids=[2])
    sampling = common_pb2.SamplingParams(max_tokens=args.output, ignore_eos=True)
    for i in range(args.requests):
        prompt = [3 + (i * 7 + j) % 30000 for j in range(args.prompt)]
        scheduler.add(Request(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sampling,
                              max_output_tokens=args.output, priority=0,
                              emit=lambda delta: None))
    executor = FakeExecutor()
    peak_blocks = peak_running = steps = 0
    started = time.perf_counter()
    while (plan := scheduler.schedule()) is not None:
        steps += 1
        peak_running = max(peak_running, len(scheduler.running))
        peak_blocks = max([peak_blocks] + [blocks.num_held_blocks(s.seq_id)
                                           for s in scheduler.running])
        scheduler.process(executor.step(plan))
    assert blocks.num_used_blocks == 0 and not scheduler.requests
    per_sequence_gib = peak_blocks * BLOCK_BYTES / GIB
    return dict(window=window, pool_blocks=num_blocks, peak_blocks_per_sequence=peak_blocks,
                gib_per_sequence=per_sequence_gib, sequences_per_gib=1 / per_sequence_gib,
                peak_running=peak_running, preemptions=scheduler.counters.preemptions,
                steps=steps, seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--pool-gib", type=float, default=16.0)
    parser.add_argument("--quick", action="store_true", help="8 requests of 64 + 512 tokens, "
                        "window 128, a 0.25 GiB pool")
    parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.prompt, args.output, args.window, args.pool_gib = 8, 64, 512, 128, 0.25
    rows = [run(None, args), run(args.window, args)]
    print(f"{args.requests} requests x ({args.prompt} prompt + {args.output} output tokens), "
          f"pool {args.pool_gib:g} GiB = {rows[0]['pool_blocks']} blocks of {BLOCK_SIZE}")
    print("| window | peak blocks / seq | GiB / seq | seqs / GiB | peak running | preemptions "
          "| steps |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['window'] or 'none (all blocks kept)'} | "
              f"{row['peak_blocks_per_sequence']} | {row['gib_per_sequence']:.3f} | "
              f"{row['sequences_per_gib']:.2f} | {row['peak_running']} | "
              f"{row['preemptions']} | {row['steps']} |")
    gain = rows[1]["sequences_per_gib"] / rows[0]["sequences_per_gib"]
    print(f"sequences per GiB: x{gain:.2f} with the window's blocks released")
    if args.json:
        args.json.write_text(json.dumps(dict(args=vars(args) | {"json": None}, rows=rows,
                                             gain=gain), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
