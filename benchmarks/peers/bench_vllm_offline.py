"""Peer B1: vLLM's CPU build, one offline `LLM.generate` over the whole reference workload.

Usage (in the vLLM venv; settings through flags and vLLM's own environment variables;
run_vllm_offline.sh runs the bindings in turn):

    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
        python benchmarks/peers/bench_vllm_offline.py --dtype bfloat16 --max-num-seqs 128

Every request is submitted at once as token ids (exactly the workload's `prompt_token_ids`),
each with its own SamplingParams(max_tokens=..., ignore_eos=True, temperature=0); vLLM's
scheduler does the continuous batching. The clock covers the one `generate` call; engine
start-up (weights, KV cache, warm-up and torch.compile) is outside it. One invocation is one
run. Prefix caching is off unless asked for, as in every row of RESULTS.md.
"""

import argparse
import json
import os
import platform
import time
from importlib.metadata import version

from peer_run import add_common_args, append_result, load_workload


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="turn vLLM's prefix caching on (off by default here)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    reqs = load_workload(args.workload, args.limit)

    engine_kwargs = dict(model=args.model_dir, tokenizer=args.model_dir, dtype=args.dtype,
                         max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                         seed=0, enforce_eager=args.enforce_eager,
                         enable_prefix_caching=args.prefix_caching)
    if args.max_num_batched_tokens:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    startup = time.perf_counter() - t0

    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
              for r in reqs]

    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t1

    got = [len(o.outputs[0].token_ids) for o in outs]
    want = [r["max_tokens"] for r in reqs]
    assert got == want, "output lengths differ from max_tokens"
    out_tokens = sum(got)
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in reqs)

    # vLLM's and OpenMP's settings as this process saw them (VLLM_VENV is our path, not vLLM's).
    env_keys = [k for k in sorted(os.environ)
                if (k.startswith("VLLM_") or k.startswith("OMP_")) and k != "VLLM_VENV"]
    res = {
        "engine": "vllm-offline",
        "vllm_cpu": version("vllm-cpu"),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "engine_kwargs": {k: v for k, v in engine_kwargs.items()
                          if k not in ("model", "tokenizer")},
        "env": {k: os.environ[k] for k in env_keys},
        "num_requests": len(reqs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "startup_s": round(startup, 2),
        "wall_s": round(wall, 2),
        "output_tok_per_s": round(out_tokens / wall, 2),
        "total_tok_per_s": round((out_tokens + prompt_tokens) / wall, 2),
        "sample_output_0": outs[0].outputs[0].text[:200],
    }
    print("RESULT " + json.dumps(res))
    append_result(args.out, res)


if __name__ == "__main__":
    main()
