"""Structured output's cost in a decode step (issue 21; docs/structured_output.md): the default
model offline, `--batch` chat requests decoding together, each step timed inside the executor
(ModelRunner.execute: forward pass, grammar masks, sampling), with and without a JSON schema
on every request, alternated round by round in one process.

    .venv/bin/python benchmarks/bench_structured_output.py [--batch 64] [--rounds 3]

Only steps in which all `--batch` sequences decode count (the median of each round's, then
the median over rounds); with a schema every answer is valid JSON and ends when its object
does, so a round also reports how many of its answers parsed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pagedserve.entrypoints.offline import LLM
from pagedserve.v1 import common_pb2

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
    "population": {"type": "integer", "minimum": 0},
    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 32},
                  "maxItems": 4}},
    "required": ["city", "country", "population", "landmarks"], "additionalProperties": False}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quito", "Seoul", "Perth"]


def timed_steps(llm: LLM, batch: int) -> list[float]:
    """Wraps the engine's runner so that each step with `batch` decodes records its time."""
    runner, times = llm._runner, []
    execute = runner.execute

    def timing(plan):
        started = time.perf_counter()
        result = execute(plan)
        if len(plan.work) == batch and all(w.num_tokens == 1 for w in plan.work):
            times.append(time.perf_counter() - started)
        return result
    runner.execute = timing
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    messages = [[{"role": "user", "content": f"Describe {CITIES[i % len(CITIES)]} as JSON."}]
                for i in range(args.batch)]
    spec = common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))
    modes = {"free": common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                               ignore_eos=True),
             "json_schema": common_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                                      structured_output=spec)}
    medians: dict[str, list[float]] = {mode: [] for mode in modes}
    with LLM(max_num_seqs=args.batch, kv_cache_gib=1.0, enable_prefix_caching=False) as llm:
        times = timed_steps(llm, args.batch)
        llm.chat(messages[:2], modes["json_schema"])  # warm-up: compiles, builds the tokenizer
        for round_ in range(args.rounds):
            for mode, params in modes.items():
                times.clear()
                outputs = llm.chat(messages, params)
                medians[mode].append(statistics.median(times))
                parsed = sum(_parses(o.outputs[0].text) for o in outputs)
                print(json.dumps({"round": round_, "mode": mode, "steps": len(times),
                                  "median_step_ms": medians[mode][-1] * 1e3,
                                  "answers_parsing_as_json": parsed}), flush=True)
    free, constrained = (statistics.median(medians[m]) for m in modes)
    print(json.dumps({"batch": args.batch, "free_step_ms": free * 1e3,
                      "json_schema_step_ms": constrained * 1e3, "ratio": constrained / free}))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
