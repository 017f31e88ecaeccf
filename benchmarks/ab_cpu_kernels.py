"""Two revisions' CPU kernels timed against each other in one process, call by call: this
machine's speed moves by 10-30 % between processes, more than most kernel changes, and the
placement of code alone has moved a kernel by 15 %. Three kernels, as the engine calls them:

- grouped: the grouped linear kernel (GGUF's formats, and int8 weights on CPUs without
  AVX-512 VNNI) over `--layers` distinct weights of one shape, float32 rows (the model's dtype
  on CPUs without AVX-512), so that the weights stream from memory as in a decode step; each
  format in its fewest bits and a byte a value;
- float: float_linear (float checkpoints on CPUs without AVX-512) the same way, the weights
  stored in float32 and, where exact (a bfloat16 checkpoint), in bfloat16;
- decode-attention: one decode step's attention over `--layers` layers' caches, as
  bench_decode_attention_cpu.py builds them.

    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels:benchmarks .venv/bin/python \\
        benchmarks/ab_cpu_kernels.py --base REV [--head REV] [--rounds 7] \\
        grouped [--formats Q4_1 Q5_K Q6_K] [--rows 1 4 16 32] [--layers 150] [--shape 1536 576]
                [--int16-activations]
    ... float [--storage float32 bfloat16] [--rows 1 4 16 32] [--layers 60] [--shape 1536 576]
    ... decode-attention [--batch 32] [--context 1024] [--layers 30] [--dtype float32] \\
        [--kv-cache-dtype auto fp8_e4m3 fp8_e5m2]

`--base` and `--head` are git revisions whose kernels/pagedserve/kernels/csrc is built with
this machine's compiler and this tree's flags (`--head` defaults to the working tree). Each
figure is the median over rounds of one pass over every layer (the builds in turn, the order
reversed each round, after one warm-up round); both builds' outputs are checked to agree first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable

import torch
from bench_decode_attention_cpu import SCALE, attention_inputs
from bench_grouped_bits_cpu import WIDTHS, random_weight

from pagedserve.kernels import cpu_kernels

REPO = pathlib.Path(__file__).resolve().parent.parent
CSRC = cpu_kernels.SOURCE_DIR.relative_to(REPO)


def revision_library(revision: str | None, scratch: pathlib.Path):
    """The kernels of `revision` (None: the working tree), built and opened."""
    source_dir = cpu_kernels.SOURCE_DIR
    if revision is not None:
        archive = scratch / f"{revision.replace('/', '_')}.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), revision,
                        str(CSRC)], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(scratch / revision.replace("/", "_"), filter="data")
        source_dir = scratch / revision.replace("/", "_") / CSRC
    path = cpu_kernels.build_library(source_dir)
    if path is None:
        raise SystemExit(f"the kernels of {revision or 'the working tree'} did not build")
    return cpu_kernels.open_library(path)


def alternated(libraries: dict, passes: dict[str, Callable[[], torch.Tensor]],
               rounds: int) -> dict[str, dict[str, float]]:
    """For each case of `passes` (a callable that runs one pass and returns its last output),
    each library's median milliseconds a pass, after checking their outputs agree."""
    results = {}
    for case, run in passes.items():
        outputs = []
        for library in libraries.values():
            with cpu_kernels.library_in_use(library):
                outputs.append(run().float())
        # float32 sums in another order (a change of code or of the compiler's scheduling of
        # it) differ by ulps of their magnitude, which grows with K.
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4,
                                   atol=1e-5 * max(1.0, outputs[0].abs().max().item()))
        times = {name: [] for name in libraries}
        for round_index in range(rounds + 1):
            for name in list(libraries) if round_index % 2 else list(libraries)[::-1]:
                with cpu_kernels.library_in_use(libraries[name]):
                    start = time.perf_counter()
                    run()
                    if round_index:
                        times[name].append((time.perf_counter() - start) * 1e3)
        results[case] = {name: statistics.median(t) for name, t in times.items()}
        base, head = results[case].values()
        print(f"{case:40} base {base:9.3f} ms  head {head:9.3f} ms  head/base {head / base:.2f}",
              flush=True)
    return results


def linear_passes(name: str, packed: list, linear: Callable, args: argparse.Namespace,
                  gen: torch.Generator) -> dict[str, Callable[[], torch.Tensor]]:
    """A pass of `linear` over every packed weight, one case per `--rows`, on float32 rows."""
    passes = {}
    for rows in args.rows:
        x = torch.randn(rows, args.shape[1], generator=gen)

        def run(x=x) -> torch.Tensor:
            for weight in packed:
                out = linear(x, weight, None)
            return out
        passes[f"{name}, {rows} rows, {args.layers} layers"] = run
    return passes


def grouped_passes(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    n, k = args.shape
    gen = torch.Generator().manual_seed(0)
    passes = {}
    for fmt in args.formats:
        weights = [dataclasses.replace(random_weight(n, k, fmt, gen, half_factors=fmt == "Q4_1"),
                                       int16_activations=args.int16_activations)
                   for _ in range(args.layers)]
        for bits in sorted({cpu_kernels.pack_grouped_cpu(weights[0]).bits, 8}):
            packed = [cpu_kernels.pack_grouped_cpu(w, bits) for w in weights]
            passes |= linear_passes(f"{fmt} in {bits} bits", packed,
                                    cpu_kernels.grouped_linear_cpu, args, gen)
    return passes


def float_passes(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    """float_linear (CPUs without AVX-512) on float32 weights, stored as they are or, where
    every value is one (`bfloat16`: a bfloat16 checkpoint), in bfloat16."""
    if not cpu_kernels.float_linear_supported():
        raise SystemExit("float: this machine's kernels have no float_linear (AVX-512 CPU)")
    gen = torch.Generator().manual_seed(0)
    passes = {}
    for storage in args.storage:
        weights = [torch.randn(*args.shape, generator=gen) for _ in range(args.layers)]
        if storage == "bfloat16":
            weights = [w.bfloat16().float() for w in weights]
        packed = [cpu_kernels.pack_linear_cpu(w) for w in weights]
        passes |= linear_passes(f"{storage} weights", packed, cpu_kernels.packed_linear_cpu,
                                args, gen)
    return passes


def attention_passes(args: argparse.Namespace) -> dict[str, Callable[[], torch.Tensor]]:
    query, tables, lens, caches = attention_inputs(args.batch, args.context, args.layers,
                                                   getattr(torch, args.dtype),
                                                   args.kv_cache_dtype)
    passes = {}
    for name, layers in caches.items():
        def run(layers=layers) -> torch.Tensor:
            out = torch.empty_like(query)
            for key_cache, value_cache in layers:
                cpu_kernels.paged_decode_attention_cpu(query, key_cache, value_cache, tables,
                                                       lens, SCALE, out=out)
            return out
        passes[f"kv {name}, {args.dtype} queries, batch {args.batch}, ~{args.context}"] = run
    return passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision")
    parser.add_argument("--head", help="git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write the figures here")
    kernels = parser.add_subparsers(dest="kernel", required=True)
    grouped = kernels.add_parser("grouped")
    grouped.add_argument("--formats", nargs="+", default=["Q4_1", "Q5_K", "Q6_K"],
                         choices=list(WIDTHS))
    grouped.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    grouped.add_argument("--layers", type=int, default=150)
    grouped.add_argument("--int16-activations", action="store_true",
                         help="as GGUF's weights are served: 4-bit values by 16-bit activations "
                              "where the kernels do so (both revisions must have them)")
    grouped.add_argument("--shape", type=int, nargs=2, default=[1536, 576],
                         metavar=("N", "K"))
    floats = kernels.add_parser("float")
    floats.add_argument("--storage", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    floats.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32])
    floats.add_argument("--layers", type=int, default=60)
    floats.add_argument("--shape", type=int, nargs=2, default=[1536, 576], metavar=("N", "K"))
    attention = kernels.add_parser("decode-attention")
    attention.add_argument("--batch", type=int, default=32)
    attention.add_argument("--context", type=int, default=1024)
    attention.add_argument("--layers", type=int, default=30)
    attention.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    attention.add_argument("--kv-cache-dtype", nargs="+", default=["auto", "fp8_e4m3"],
                           choices=["auto", "fp8_e4m3", "fp8_e5m2"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        libraries = {name: revision_library(revision, pathlib.Path(scratch))
                     for name, revision in (("base", args.base), ("head", args.head))}
    passes = {"grouped": grouped_passes, "float": float_passes,
              "decode-attention": attention_passes}[args.kernel](args)
    with torch.inference_mode():
        results = alternated(libraries, passes, args.rounds)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"base": args.base, "head": args.head or "working tree",
                       "threads": torch.get_num_threads(), "ms_a_pass": results}, out, indent=1)


if __name__ == "__main__":
    main()
