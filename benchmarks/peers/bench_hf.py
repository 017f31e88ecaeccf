"""Baseline A: transformers `generate` with static batching, over the reference workload.

Usage (in the peers venv; run_hf.sh runs the grid):

    python benchmarks/peers/bench_hf.py --dtype bfloat16 --batch-size 32 --out results/hf.jsonl

What a user gets without a serving engine. The workload is cut into consecutive batches in file
order (no sorting). Each batch is left-padded to its longest prompt and decoded greedily, EOS
disabled, for the batch's largest `max_tokens` steps, so every sequence runs that long. Only the
tokens each request asked for count as output; the steps shorter requests ride along for are
reported as `wasted_output_tokens`.

The clock covers building the padded batches and every `generate` call, nothing else (model
load and a 4-token warm-up are outside). One invocation is one run: run it several times.
benchmarks/hf_baseline.py measures the same way from the project's own venv.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch
import transformers
from peer_run import add_common_args, append_result, load_workload
from transformers import AutoModelForCausalLM, GenerationConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    reqs = load_workload(args.workload, args.limit)

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    # Greedy, and nothing ends a sequence early (eos_token_id=None).
    def gen_cfg(n):
        return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                eos_token_id=None, pad_token_id=pad_id, use_cache=True)

    def make_batch(batch):
        width = max(len(r["prompt_token_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            p = r["prompt_token_ids"]
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    # Warm-up, outside the clock.
    with torch.inference_mode():
        ids, mask = make_batch(reqs[:2])
        model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg(4))

    batches = [reqs[i:i + args.batch_size] for i in range(0, len(reqs), args.batch_size)]
    per_batch = []
    generated = useful = wasted = 0
    t_start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            tb = time.perf_counter()
            ids, mask = make_batch(b)
            steps = max(r["max_tokens"] for r in b)
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 generation_config=gen_cfg(steps))
            new = out.shape[1] - ids.shape[1]
            assert new == steps, (new, steps)
            generated += new * len(b)
            u = sum(r["max_tokens"] for r in b)
            useful += u
            wasted += new * len(b) - u
            per_batch.append({"n": len(b), "padded_prompt": ids.shape[1], "steps": steps,
                              "s": round(time.perf_counter() - tb, 3)})
    wall = time.perf_counter() - t_start

    res = {
        "engine": "hf-transformers-generate",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "num_requests": len(reqs),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
        "useful_output_tokens": useful,
        "generated_tokens_incl_padding_steps": generated,
        "wasted_output_tokens": wasted,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "output_tok_per_s": round(useful / wall, 2),
        "per_batch": per_batch,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "per_batch"}, indent=1))
    append_result(args.out, res)


if __name__ == "__main__":
    sys.exit(main())
