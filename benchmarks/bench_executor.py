"""Executor step time: pagedserve's paged model against `transformers`, on the CPU.

For one model directory (default: the embedded SmolLM2-135M-Instruct, converted once into the
pagedserve cache) this measures, in one run and on the same weights:

1. Decode step time at each batch size (``--batch-sizes``, default 1,16,64,256) with every
   sequence holding ``--context`` tokens (default 256). Each engine first prefills the contexts
   (not timed), then runs ``--warmup`` and ``--steps`` single-token decode steps, interleaved
   step by step between the two engines, each step producing logits for the last token of each
   sequence only.
   - pagedserve: ``ScheduledSequence`` list -> ``build_flat_batch`` (timed: it is per-step work
     of the engine) -> ``model(...)`` -> ``model.compute_logits`` on the last-token rows, with a
     paged KV cache bound through ``bind_kv_caches``.
   - transformers: ``AutoModelForCausalLM`` forward on ``[batch, 1]`` tokens with its
     ``DynamicCache`` from the prefill, ``use_cache=True``, ``logits_to_keep=1``.
2. Prefill throughput for a batch of ``--prefill-tokens`` tokens (default 2048) made of equal
   prompts of ``--prompt-len`` tokens (default 256, i.e. 8 prompts): one flat batch for
   pagedserve, one ``[8, 256]`` forward (no padding needed) for transformers.

Times are medians over the timed steps (or prefill repeats). The ratio column is
pagedserve time / transformers time: below 1.0 pagedserve is faster. The last column is the
largest absolute difference between the two engines' logits on the first warm-up step, a check
that both compute the same thing (expect ~1e-4 in float32; in bfloat16 each engine is ~0.4
away from float32 on the default model, so up to ~2 between them).

Run from the repository root (on an otherwise idle machine, for numbers worth keeping):

    .venv/bin/python benchmarks/bench_executor.py
    .venv/bin/python benchmarks/bench_executor.py --dtype bfloat16 --batch-sizes 1,16
    .venv/bin/python benchmarks/bench_executor.py --output-markdown bench.md
    .venv/bin/python benchmarks/bench_executor.py --quick --model DIR   # smoke run, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from machine_info import cpu_info
from torch import nn
from transformers import AutoModelForCausalLM

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
from pagedserve.executor.model_files import default_cache_dir, resolve_model
from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import bind_kv_caches, kv_cache_shape
from pagedserve.runtime.log import configure_logging

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Defaults of the full run, and of --quick (explicit flags win over either).
FULL = dict(batch_sizes=[1, 16, 64, 256], context=256, steps=8, warmup=2,
            prefill_tokens=2048, prompt_len=256, prefill_repeats=3)
QUICK = dict(batch_sizes=[1, 4], context=16, steps=2, warmup=1,
             prefill_tokens=64, prompt_len=16, prefill_repeats=1)

# The untimed context prefill of the paged engine goes in flat batches of about this many tokens.
PREFILL_CHUNK_TOKENS = 8192


# --- command line -----------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory or .gguf file "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: every core this process may use)")
    parser.add_argument("--batch-sizes", type=_int_list, help="decode batch sizes, e.g. 1,16,64")
    parser.add_argument("--context", type=int, help="tokens in each sequence before decoding")
    parser.add_argument("--steps", type=int, help="timed decode steps per batch size")
    parser.add_argument("--warmup", type=int, help="untimed decode steps (and prefill repeats)")
    parser.add_argument("--prefill-tokens", type=int, help="tokens in the prefill batch")
    parser.add_argument("--prompt-len", type=int, help="tokens per prompt of the prefill batch")
    parser.add_argument("--prefill-repeats", type=int, help="timed prefill forwards")
    parser.add_argument("--block-size", type=int, default=16, help="paged KV block size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--output-markdown", type=pathlib.Path,
                        help="also write the report (machine, command, table) to this file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.prefill_tokens % args.prompt_len:
        parser.error("--prefill-tokens must be a multiple of --prompt-len")
    if min(args.batch_sizes + [args.context, args.steps, args.prompt_len, args.threads]) < 1:
        parser.error("sizes, steps and threads must be positive")
    return args


# --- the two engines --------------------------------------------------------------------------

@dataclass
class PagedSequence:
    block_table: list[int]
    num_computed: int  # tokens whose K/V are in the cache


class PagedEngine:
    """Our model on one paged KV cache, with a trivial block allocator."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.model, self.block_size, self.num_blocks = model, block_size, num_blocks
        caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                  for shape in kv_cache_shape(model, num_blocks, block_size)]
        bind_kv_caches(model, caches)
        self.next_free = 0

    def reset(self) -> None:
        """Free every block (their stale contents are masked out by the sequence lengths)."""
        self.next_free = 0

    def new_sequence(self, max_tokens: int) -> PagedSequence:
        """A sequence with blocks for `max_tokens` tokens reserved up front, so the timed steps
        do no allocation (that is the scheduler's work, not the executor's)."""
        count = -(-max_tokens // self.block_size)
        if self.next_free + count > self.num_blocks:
            raise RuntimeError("paged KV cache too small for this workload")
        table = list(range(self.next_free, self.next_free + count))
        self.next_free += count
        return PagedSequence(table, 0)

    def step(self, seqs: Sequence[PagedSequence], tokens: Sequence[list[int]]) -> torch.Tensor:
        """One engine step: flat batch metadata, forward, logits of each sequence's last token.
        Single-token sequences must come first (decodes first)."""
        scheduled = [ScheduledSequence(list(toks), seq.num_computed, seq.block_table)
                     for seq, toks in zip(seqs, tokens, strict=True)]
        batch = build_flat_batch(scheduled, self.block_size)
        hidden = self.model(batch.input_ids, batch.positions, batch.meta)
        logits = self.model.compute_logits(hidden[batch.last_token_rows])
        for seq, toks in zip(seqs, tokens, strict=True):
            seq.num_computed += len(toks)
        return logits

    def prefill(self, seqs: Sequence[PagedSequence], prompts: torch.Tensor) -> torch.Tensor:
        """Untimed context prefill in flat batches of about PREFILL_CHUNK_TOKENS tokens."""
        per_batch = max(1, PREFILL_CHUNK_TOKENS // prompts.shape[1])
        logits = []
        for start in range(0, len(seqs), per_batch):
            rows = prompts[start:start + per_batch].tolist()
            logits.append(self.step(seqs[start:start + per_batch], rows))
        return torch.cat(logits)


class TransformersEngine:
    """`transformers`' own forward with its KV cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def forward(self, input_ids: torch.Tensor, cache: object | None) -> tuple[torch.Tensor, object]:
        """Logits [batch, vocab] after the last position, and the (updated) cache."""
        out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_kwarg: cache},
                         **self.keep_kwargs)
        new_cache = out.get("cache", None)
        if new_cache is None:
            new_cache = out.get("past_key_values", None)
        return out.logits[:, -1], new_cache

    def decode(self, input_ids: torch.Tensor, cache: object) -> torch.Tensor:
        """One decode step; `cache` (a transformers Cache) is updated in place."""
        return self.forward(input_ids, cache)[0]


# --- measurements -----------------------------------------------------------------------------

@dataclass
class Result:
    workload: str
    kind: str  # "decode" or "prefill"
    tokens: int  # tokens computed per step / per forward
    paged_s: float  # median seconds per step / per forward
    hf_s: float
    max_abs_diff: float


def timed(fn: Callable[..., torch.Tensor], *args: object) -> tuple[float, torch.Tensor]:
    """Seconds `fn(*args)` took, and its result."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run_interleaved(calls: dict[str, tuple[Callable[..., torch.Tensor], tuple]], step: int,
                    warmup: int, times: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Run each engine's call once, alternating which goes first so that neither always runs
    on the other's warm caches; record the times of the steps after the warm-up."""
    names = list(calls) if step % 2 == 0 else list(calls)[::-1]
    outputs = {}
    for name in names:
        fn, fn_args = calls[name]
        elapsed, outputs[name] = timed(fn, *fn_args)
        if step >= warmup:
            times[name].append(elapsed)
    return outputs


def bench_decode(paged: PagedEngine, hf: TransformersEngine, vocab: int, batch: int,
                 args: argparse.Namespace, gen: torch.Generator) -> Result:
    total_steps = args.warmup + args.steps
    contexts = torch.randint(0, vocab, (batch, args.context), generator=gen)
    next_tokens = torch.randint(0, vocab, (total_steps, batch), generator=gen)

    paged.reset()
    seqs = [paged.new_sequence(args.context + total_steps) for _ in range(batch)]
    paged.prefill(seqs, contexts)
    _, cache = hf.forward(contexts, None)

    times: dict[str, list[float]] = {"paged": [], "hf": []}
    diff = float("nan")
    for i in range(total_steps):
        column = next_tokens[i]
        outputs = run_interleaved({
            "paged": (paged.step, (seqs, [[t] for t in column.tolist()])),
            "hf": (hf.decode, (column[:, None], cache)),
        }, i, args.warmup, times)
        if i == 0:
            diff = max_abs_diff(outputs["paged"], outputs["hf"])
    del cache
    return Result(f"decode, batch {batch}, context {args.context}", "decode", batch,
                  statistics.median(times["paged"]), statistics.median(times["hf"]), diff)


def bench_prefill(paged: PagedEngine, hf: TransformersEngine, vocab: int,
                  args: argparse.Namespace, gen: torch.Generator) -> Result:
    num_prompts = args.prefill_tokens // args.prompt_len
    prompts = torch.randint(0, vocab, (num_prompts, args.prompt_len), generator=gen)
    rows = prompts.tolist()
    paged.reset()
    seqs = [paged.new_sequence(args.prompt_len) for _ in range(num_prompts)]

    def paged_prefill() -> torch.Tensor:
        for seq in seqs:  # the same blocks, overwritten by every repeat
            seq.num_computed = 0
        return paged.step(seqs, rows)

    def hf_prefill() -> torch.Tensor:
        return hf.forward(prompts, None)[0]

    times: dict[str, list[float]] = {"paged": [], "hf": []}
    diff = float("nan")
    for i in range(args.warmup + args.prefill_repeats):
        outputs = run_interleaved({"paged": (paged_prefill, ()), "hf": (hf_prefill, ())},
                                  i, args.warmup, times)
        if i == 0:
            diff = max_abs_diff(outputs["paged"], outputs["hf"])
    return Result(f"prefill, {num_prompts} × {args.prompt_len} tokens", "prefill",
                  args.prefill_tokens, statistics.median(times["paged"]),
                  statistics.median(times["hf"]), diff)


# --- report -----------------------------------------------------------------------------------

def machine_lines(args: argparse.Namespace, model_dir: pathlib.Path, attn_impl: str) -> list[str]:
    cpu, physical = cpu_info()
    return [
        f"- CPU: {cpu}",
        f"- cores: {os.cpu_count()} logical"
        + (f", {physical} physical" if physical else "")
        + f", {len(os.sched_getaffinity(0))} usable by this process",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
        f"- dtype: {args.dtype}, threads: {torch.get_num_threads()}, "
        f"KV block size: {args.block_size}, transformers attention: {attn_impl}",
        f"- model: {model_dir}",
        f"- decode: {args.warmup} warm-up + {args.steps} timed steps per batch size; "
        f"prefill: {args.warmup} warm-up + {args.prefill_repeats} timed forwards; "
        "medians reported",
    ]


def format_cell(result: Result, seconds: float) -> str:
    tok_s = result.tokens / seconds
    if result.kind == "decode":
        return f"{seconds * 1e3:.2f} ms/step ({tok_s:,.0f} tok/s)"
    return f"{tok_s:,.0f} tok/s ({seconds * 1e3:.1f} ms)"


def markdown_table(results: Sequence[Result]) -> list[str]:
    lines = ["| workload | pagedserve | transformers | time ratio paged/transformers "
             "| max abs Δ logits |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.workload} | {format_cell(r, r.paged_s)} | {format_cell(r, r.hf_s)} "
                     f"| {r.paged_s / r.hf_s:.2f} | {r.max_abs_diff:.1e} |")
    return lines


def report(args: argparse.Namespace, model_dir: pathlib.Path, attn_impl: str,
           results: Sequence[Result]) -> str:
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    lines = ["## Executor step time: pagedserve vs transformers", "",
             *machine_lines(args, model_dir, attn_impl), "", "```", command, "```", "",
             *markdown_table(results), "",
             "Ratio below 1.0: pagedserve is faster. Decode rows: one step for the whole batch, "
             "logits of the last token of each sequence only; the pagedserve time includes "
             "building the flat batch metadata."]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------

def load_engines(model_dir: pathlib.Path, dtype: torch.dtype, num_blocks: int,
                 block_size: int) -> tuple[PagedEngine, TransformersEngine, str]:
    paged = PagedEngine(load_model(model_dir, dtype), num_blocks, block_size, dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    attn_impl = getattr(hf_model.config, "_attn_implementation", None) or "default"
    return paged, TransformersEngine(hf_model), attn_impl


def blocks_needed(args: argparse.Namespace) -> int:
    per_seq = -(-(args.context + args.warmup + args.steps) // args.block_size)
    prefill = (args.prefill_tokens // args.prompt_len) * -(-args.prompt_len // args.block_size)
    return max(max(args.batch_sizes) * per_seq, prefill)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("bench-executor", "info", "console")  # to stderr: stdout is the report
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    dtype = DTYPES[args.dtype]
    model_dir = resolve_model(args.model, default_cache_dir()).path
    config = transformers.AutoConfig.from_pretrained(model_dir)
    longest = max(args.context + args.warmup + args.steps, args.prompt_len)
    if longest > config.max_position_embeddings:
        sys.exit(f"{longest} tokens per sequence exceed the model's "
                 f"max_position_embeddings ({config.max_position_embeddings})")

    gen = torch.Generator().manual_seed(args.seed)
    results = []
    with torch.inference_mode():
        paged, hf, attn_impl = load_engines(model_dir, dtype, blocks_needed(args),
                                            args.block_size)
        for batch in args.batch_sizes:
            results.append(bench_decode(paged, hf, config.vocab_size, batch, args, gen))
            print(f"done: {results[-1].workload}", file=sys.stderr, flush=True)
            gc.collect()
        results.append(bench_prefill(paged, hf, config.vocab_size, args, gen))

    text = report(args, model_dir, attn_impl, results)
    print(text, end="")
    if args.output_markdown:
        args.output_markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
