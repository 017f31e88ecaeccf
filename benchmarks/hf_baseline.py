"""Baseline: the `pagedserve bench` workload through transformers `generate`, static batching.

What a user would run without a serving engine, measured the way `benchmarks/peers/bench_hf.py`
measured it, so the figures compare with `benchmarks/peers/RESULTS.md`:

- the workload (the same `--dataset` flags as `pagedserve bench`, e.g. `--dataset jsonl
  --dataset-path benchmarks/workloads/reference.jsonl`) is cut into consecutive batches in its order
  (no sorting: a serving engine does not get to sort its traffic either);
- each batch is left-padded to its longest prompt and decoded greedily for its largest output
  length, with EOS disabled (`min_new_tokens` = `max_new_tokens`, no `eos_token_id`), so every
  sequence runs that long;
- only the tokens each request asked for count as output; the extra steps shorter requests ride
  along are reported as `wasted_output_tokens`;
- every batch size of `--batch-sizes` (default 16,32,64) runs the whole workload, and the best
  is the baseline. Loading the model and a small warm-up `generate` are not timed.

Run from the repository root (default model: the embedded SmolLM2-135M-Instruct as pagedserve
converts it, i.e. the Hugging Face directory every engine loads):

    .venv/bin/python benchmarks/hf_baseline.py --dataset jsonl \
        --dataset-path benchmarks/workloads/reference.jsonl --dtype bfloat16
    .venv/bin/python benchmarks/hf_baseline.py --num-prompts 16 --input-len 64 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence

from pagedserve.bench.cli import add_dataset_arguments, load_requests
from pagedserve.bench.datasets import BenchRequest


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=pathlib.Path, default=None,
                        help="Hugging Face model directory (default: the embedded model, "
                             "converted into the pagedserve cache)")
    parser.add_argument("--batch-sizes", default="16,32,64",
                        help="comma-separated static batch sizes; the best one is reported")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads")
    parser.add_argument("--result-json", type=pathlib.Path, default=None)
    add_dataset_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes: expected integers separated by commas, got "
                     f"{args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: every batch size must be positive")
    return args


def default_model_dir() -> pathlib.Path:
    from pagedserve.executor.model_files import default_cache_dir, resolve_model

    # transformers runs the float conversion (it does not read our native GGUF directory).
    return resolve_model(None, default_cache_dir(), gguf_dequantize=True).path


def token_prompts(requests: Sequence[BenchRequest], model_dir: pathlib.Path) -> list[list[int]]:
    """Each prompt as token ids; text-only prompts are encoded without special tokens (as the
    reference workload's ids were made)."""
    tokenizer = None
    prompts = []
    for request in requests:
        if request.prompt_token_ids is not None:
            prompts.append(list(request.prompt_token_ids))
            continue
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompts.append(tokenizer(request.prompt, add_special_tokens=False).input_ids)
    return prompts


def left_padded(prompts: Sequence[list[int]], pad_id: int):
    """(input_ids, attention_mask), each prompt right-aligned to the longest."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate(model, prompts: Sequence[list[int]], steps: int, pad_id: int) -> int:
    """Greedy `generate` of exactly `steps` new tokens for every prompt (EOS disabled); the
    number of new tokens per sequence."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                              eos_token_id=None, pad_token_id=pad_id, use_cache=True)
    ids, mask = left_padded(prompts, pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out.shape[1] - ids.shape[1]


def run_batch_size(model, prompts: list[list[int]], output_lens: list[int], batch_size: int,
                   pad_id: int) -> dict:
    """The whole workload in consecutive batches of `batch_size`, timed."""
    useful = generated = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        lens = output_lens[first:first + batch_size]
        steps = max(lens)
        new = generate(model, prompts[first:first + batch_size], steps, pad_id)
        if new != steps:
            raise RuntimeError(f"generate made {new} tokens per sequence, asked for {steps}")
        generated += new * len(lens)
        useful += sum(lens)
    wall = time.perf_counter() - start
    return {"batch_size": batch_size, "wall_s": wall, "useful_output_tokens": useful,
            "wasted_output_tokens": generated - useful, "output_tok_per_s": useful / wall}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    model.eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    requests = load_requests(args, model.config.vocab_size)
    prompts = token_prompts(requests, model_dir)
    output_lens = [r.output_len for r in requests]
    generate(model, [p[:16] for p in prompts[:2]], 4, pad_id)  # warm-up, not timed

    runs = []
    for batch_size in args.batch_sizes:
        runs.append(run_batch_size(model, prompts, output_lens, batch_size, pad_id))
        print(f"batch {batch_size}: {runs[-1]['output_tok_per_s']:.2f} output tok/s "
              f"({runs[-1]['wall_s']:.1f} s)", file=sys.stderr)
    best = max(runs, key=lambda run: run["output_tok_per_s"])
    result = {"engine": "transformers generate, static batching",
              "transformers": transformers.__version__, "torch": torch.__version__,
              "python": platform.python_version(), "model_dir": str(model_dir),
              "dtype": args.dtype, "threads": torch.get_num_threads(),
              "num_prompts": len(requests), "prompt_tokens": sum(map(len, prompts)),
              "best_batch_size": best["batch_size"],
              "output_tok_per_s": best["output_tok_per_s"], "runs": runs}
    print(json.dumps(result, indent=1))
    if args.result_json is not None:
        args.result_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
