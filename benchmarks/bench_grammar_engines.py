"""Grammar engines for structured output, measured where pagedserve would use one (issue 21;
docs/structured_output.md): xgrammar, llguidance and outlines-core on the default model's
tokenizer (49,152 tokens).

For each engine and each JSON schema below: the compile time (tokenizer set-up apart, which
happens once per model), then a valid answer fed token by token as a sampler would, timing at
each position the token mask (written into a bitmask, as the executor's sampler would apply
it) and the advance by the sampled token. The engines are not dependencies of pagedserve until
one is chosen; install them beside it to run this:

    pip install --target /tmp/grammar-engines --no-deps xgrammar llguidance outlines-core \\
        apache-tvm-ffi
    PYTHONPATH=/tmp/grammar-engines .venv/bin/python benchmarks/bench_grammar_engines.py \\
        --out benchmarks/results/grammar_engines_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time
from importlib.metadata import version

import torch
from transformers import AutoTokenizer

from pagedserve.executor.model_files import default_cache_dir, resolve_model

# A small schema and a large one (nested objects, arrays, enums, bounded strings and numbers:
# what tool arguments and extraction schemas look like).
SMALL = {"type": "object", "properties": {"name": {"type": "string"},
                                          "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False}
ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 64}, "city": {"type": "string"},
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    "country": {"enum": ["US", "CA", "MX", "FR", "DE"]}},
    "required": ["street", "city", "zip", "country"], "additionalProperties": False}
LARGE = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0},
    "customer": {"type": "object", "properties": {
        "name": {"type": "string"}, "email": {"type": "string"},
        "address": ADDRESS, "tags": {"type": "array", "items": {"type": "string"},
                                     "maxItems": 8}},
        "required": ["name", "email", "address", "tags"], "additionalProperties": False},
    "items": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
            "price": {"type": "number"}, "gift": {"type": "boolean"}},
        "required": ["sku", "quantity", "price", "gift"], "additionalProperties": False}},
    "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["id", "customer", "items", "status", "note"], "additionalProperties": False}
ANSWERS = {
    "small": (SMALL, {"name": "Ada Lovelace", "age": 36}),
    "large": (LARGE, {
        "id": 4711, "customer": {
            "name": "Grace Hopper", "email": "grace@example.com",
            "address": {"street": "1 Navy Way", "city": "Arlington", "zip": "22202",
                        "country": "US"},
            "tags": ["vip", "compiler", "cobol"]},
        "items": [{"sku": "A-100", "quantity": 2, "price": 9.5, "gift": False},
                  {"sku": "B-7", "quantity": 1, "price": 120.25, "gift": True},
                  {"sku": "C-33", "quantity": 12, "price": 0.99, "gift": False}],
        "status": "paid", "note": None}),
}


def _xgrammar(tokenizer, vocab_size):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_(schema: str):
        compiled = compiler.compile_json_schema(schema, any_whitespace=False,
                                               separators=(",", ":"))

        class Matcher:
            def __init__(self):
                self.m = xgr.GrammarMatcher(compiled)

            def mask(self, bitmask):
                self.m.fill_next_token_bitmask(bitmask)

            def advance(self, token):
                assert self.m.accept_token(token), token
        return Matcher
    return compile_, lambda: xgr.allocate_token_bitmask(1, vocab_size)


def _llguidance(tokenizer, vocab_size):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile_(schema: str):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        # Compiling happens when the first matcher is made; later ones reuse the cache.
        llguidance.LLMatcher(lltok, grammar)

        class Matcher:
            def __init__(self):
                self.m = llguidance.LLMatcher(lltok, grammar)

            def mask(self, bitmask):
                llguidance.torch.fill_next_token_bitmask(self.m, bitmask, 0)

            def advance(self, token):
                assert self.m.consume_token(token), (token, self.m.get_error())
        return Matcher
    return compile_, lambda: llguidance.torch.allocate_token_bitmask(1, vocab_size)


def _outlines_core(tokenizer, vocab_size):
    from outlines_core import Guide, Index, Vocabulary, json_schema

    eos = tokenizer.eos_token_id
    tokens: dict[str, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos and token_id < vocab_size:
            text = tokenizer.convert_tokens_to_string([token])
            tokens.setdefault(text, []).append(token_id)
    vocabulary = Vocabulary(eos, tokens)

    def compile_(schema: str):
        index = Index(json_schema.build_regex_from_schema(schema, whitespace_pattern=""),
                      vocabulary)

        class Matcher:
            def __init__(self):
                self.g = Guide(index)

            def mask(self, bitmask):
                self.g.write_mask_into(bitmask.data_ptr(), bitmask.numel(),
                                       bitmask.element_size())

            def advance(self, token):
                self.g.advance(token)
        return Matcher
    return compile_, lambda: torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)


ENGINES = {"xgrammar": _xgrammar, "llguidance": _llguidance, "outlines-core": _outlines_core}


def measure(make, tokenizer, vocab_size: int, repeats: int) -> dict:
    started = time.perf_counter()
    compile_, new_bitmask = make(tokenizer, vocab_size)
    result = {"tokenizer_setup_s": time.perf_counter() - started, "schemas": {}}
    for name, (schema, answer) in ANSWERS.items():
        text = json.dumps(answer, separators=(",", ":"))
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        started = time.perf_counter()
        matcher_class = compile_(json.dumps(schema))
        compile_s = time.perf_counter() - started
        bitmask = new_bitmask()
        masks, advances = [], []
        for _ in range(repeats):
            matcher = matcher_class()
            for token in token_ids:
                t0 = time.perf_counter()
                matcher.mask(bitmask)
                t1 = time.perf_counter()
                matcher.advance(token)
                advances.append(time.perf_counter() - t1)
                masks.append(t1 - t0)
        masks.sort()
        result["schemas"][name] = {
            "compile_s": compile_s, "answer_tokens": len(token_ids),
            "mask_us_mean": statistics.fmean(masks) * 1e6,
            "mask_us_p50": masks[len(masks) // 2] * 1e6,
            "mask_us_p99": masks[int(len(masks) * 0.99)] * 1e6,
            "advance_us_mean": statistics.fmean(advances) * 1e6}
        print(json.dumps({"engine": make.__name__.lstrip("_"), "schema": name,
                          **result["schemas"][name]}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    model_dir = resolve_model(None, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir.path)
    vocab_size = int(model_dir.config["vocab_size"])
    torch.set_num_threads(1)
    report = {"vocab_size": vocab_size, "cpus": os.cpu_count(), "engines": {}}
    for name in args.engines.split(","):
        report["engines"][name] = {"version": version(name),
                                   **measure(ENGINES[name], tokenizer, vocab_size,
                                             args.repeats)}
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
