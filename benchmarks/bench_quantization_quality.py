"""What quantization costs in quality on the default model (issue 19): perplexity on a fixed
text and greedy agreement on fixed prompts, int8 (W8A16), w8a8_int8 (dynamic per-token W8A8)
and the GGUF run natively against bfloat16, and every row against float32 (the more exact
reference).

    python benchmarks/bench_quantization_quality.py [--modes float32 bf16 int8 w8a8_int8 gguf]
        [--prompts 32] [--max-tokens 32] [--text-tokens 0] [--window 1024] [--max-num-seqs N]
        [--json out.json]

Each mode loads the embedded SmolLM2-135M-Instruct through the offline `LLM` (float32 and bf16:
its GGUF dequantized at load, `gguf_dequantize`, in that dtype; int8 and w8a8_int8: that
dequantized model in bfloat16 with that `quantization`; gguf: its Q4_1 and Q8_0 weights run
natively, dtype bfloat16), one after the other in this process, with the kernels the engine
picks on this machine. Per mode:

- perplexity: benchmarks/workloads/quality_text.txt (prose written for this benchmark, so no
  model has seen it; about 4,400 tokens), tokenized without special tokens (first
  `--text-tokens` only when given), cut into consecutive windows of `--window` tokens, each
  sent as a prompt with `prompt_logprobs=1`: exp of minus the mean logprob the engine returns
  for every token of a window after its first. Beside it, the text's top-1 agreement with a
  reference mode: the share of those positions whose most likely next token is the reference's.
- greedy agreement: the first `--prompts` of PROMPTS (the 16 of pagedserve/testing/prompts.py,
  which tests/test_bf16_parity.py uses, then 16 more), `--max-tokens` tokens each,
  temperature 0, ignore_eos, all in one batch; against a reference mode, how many prompts
  start with the reference's first token and the mean length of the common prefix of the two
  outputs (in tokens, out of `--max-tokens`). `--max-num-seqs` decodes them that many at a
  time (the engine's flag): the kernels' paths for small batches then run (on CPUs without
  AVX-512, GGUF's 4-bit weights by activations rounded to 16 bits, up to 8 rows), where the
  whole batch at once takes the larger batches' paths.

Prints a table per reference (bf16, float32) and writes every figure to `--json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pathlib
import time

import torch
from machine_info import cpu_info

from pagedserve.entrypoints.offline import LLM
from pagedserve.kernels.dispatch import select_kernels
from pagedserve.testing.prompts import GREEDY_PROMPTS
from pagedserve.v1.common_pb2 import SamplingParams

TEXT = pathlib.Path(__file__).resolve().parent / "workloads" / "quality_text.txt"
# mode -> (dtype, quantization, the GGUF dequantized at load)
MODES = {"float32": ("float32", None, True), "bf16": ("bfloat16", None, True),
         "int8": ("bfloat16", "int8", True), "w8a8_int8": ("bfloat16", "w8a8_int8", True),
         "gguf": ("bfloat16", None, False)}
PROMPTS = GREEDY_PROMPTS + [
    # more of the same kinds: facts, instructions, stories, code, lists
    "The main causes of the First World War were", "A good night's sleep helps because",
    "The Pacific Ocean is", "Dear Sir or Madam, I am writing to",
    "SELECT name, age FROM users WHERE", "The recipe calls for two cups of flour and",
    "Here are three tips for learning a new language:", "The human heart has four chambers:",
    "for i in range(10):\n", "The old lighthouse keeper looked out at the sea and",
    "Shakespeare wrote many plays, including", "The difference between weather and climate is",
    "To change a flat tyre, you need", "The Roman Empire fell in",
    "Once the meeting started, the manager said", "<html>\n<head>\n<title>",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_mode(mode: str, windows: list[list[int]], prompts: list[str], max_tokens: int,
             window: int, max_num_seqs: int | None) -> dict:
    """One mode's text logprobs and argmaxes (every window position after the first) and its
    greedy outputs."""
    dtype, quantization, dequantize = MODES[mode]
    start = time.perf_counter()
    batch = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
    llm = LLM(dtype=dtype, quantization=quantization, gguf_dequantize=dequantize,
              kv_cache_gib=0.5, max_model_len=max(window, 256) + max_tokens, **batch)
    try:
        scored = llm.generate(windows, SamplingParams(max_tokens=1, temperature=0,
                                                      prompt_logprobs=1))
        logprobs, argmaxes = [], []
        for output in scored:
            for entry in output.prompt_logprobs[1:]:  # the first token has no logprob
                logprobs.append(entry.chosen.logprob)
                argmaxes.append(entry.top[0].token_id)
        greedy = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                      ignore_eos=True))
    finally:
        llm.close()
        del llm
        gc.collect()
    return {"logprobs": logprobs, "argmaxes": argmaxes,
            "outputs": [o.outputs[0].token_ids for o in greedy],
            "seconds": time.perf_counter() - start}


def compare(run: dict, ref: dict) -> dict:
    prefixes = [common_prefix(a, b) for a, b in zip(run["outputs"], ref["outputs"], strict=True)]
    same_argmax = sum(a == b for a, b in zip(run["argmaxes"], ref["argmaxes"], strict=True))
    return {"perplexity_change": perplexity(run) / perplexity(ref) - 1,
            "text_top1_agreement": same_argmax / len(ref["argmaxes"]),
            "first_token_matches": sum(n >= 1 for n in prefixes),
            "first_token_agreement": sum(n >= 1 for n in prefixes) / len(prefixes),
            "mean_common_prefix": sum(prefixes) / len(prefixes),
            "full_matches": sum(n == len(b) for n, b in zip(prefixes, ref["outputs"],
                                                              strict=True)),
            "common_prefixes": prefixes}


def perplexity(run: dict) -> float:
    return math.exp(-sum(run["logprobs"]) / len(run["logprobs"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--text-tokens", type=int, default=0, help="0: the whole text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, help="default: the engine's")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if "bf16" not in args.modes:
        parser.error("--modes must include bf16 (the reference)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    started = time.perf_counter()

    from transformers import AutoTokenizer  # the default model's, as the engine resolves it

    from pagedserve.executor.model_files import default_cache_dir, resolve_model
    model = resolve_model(None, default_cache_dir())
    ids = AutoTokenizer.from_pretrained(model.path)(TEXT.read_text(),
                                                    add_special_tokens=False).input_ids
    if args.text_tokens:
        ids = ids[:args.text_tokens]
    windows = [ids[i:i + args.window] for i in range(0, len(ids), args.window)]
    windows = [w for w in windows if len(w) > 1]
    prompts = PROMPTS[:args.prompts]

    runs = {mode: run_mode(mode, windows, prompts, args.max_tokens, args.window,
                           args.max_num_seqs)
            for mode in args.modes}
    refs = [ref for ref in ("bf16", "float32") if ref in runs]
    cpu, cores = cpu_info()
    results = {
        "model": model.served_name, "cpu": cpu, "physical_cores": cores,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "kernels": select_kernels("auto", torch.device("cpu")).name,
        "text": {"path": str(TEXT.relative_to(TEXT.parents[2])), "tokens": len(ids),
                 "window": args.window, "windows": len(windows),
                 "scored_tokens": len(runs["bf16"]["logprobs"])},
        "prompts": len(prompts), "max_tokens": args.max_tokens,
        "max_num_seqs": args.max_num_seqs,
        "modes": {mode: {"dtype": MODES[mode][0],
                         "quantization": MODES[mode][1] or ("none" if MODES[mode][2] else "gguf"),
                         "perplexity": perplexity(run), "seconds": run["seconds"],
                         "vs": {ref: compare(run, runs[ref]) for ref in refs}}
                  for mode, run in runs.items()},
    }
    results["wall_s"] = time.perf_counter() - started

    text = results["text"]
    print(f"{results['model']}: perplexity over {text['scored_tokens']} tokens of "
          f"{text['path']} ({text['windows']} windows of <= {text['window']}); greedy on "
          f"{len(prompts)} prompts x {args.max_tokens} tokens; {results['kernels']} kernels, "
          f"{cpu}, {results['threads']} threads")
    for ref in refs:
        print(f"\nvs {ref}:")
        print(f"{'mode':10} {'perplexity':>10} {'change':>8} {'text top-1':>10} "
              f"{'1st token':>10} {'mean prefix':>12} {'full':>6}")
        for mode, figures in results["modes"].items():
            vs = figures["vs"][ref]
            print(f"{mode:10} {figures['perplexity']:10.3f} {vs['perplexity_change']:+8.2%} "
                  f"{vs['text_top1_agreement']:10.2%} "
                  f"{vs['first_token_matches']:>5}/{len(prompts):<4} "
                  f"{vs['mean_common_prefix']:7.1f}/{args.max_tokens:<4} "
                  f"{vs['full_matches']:>6}")
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
