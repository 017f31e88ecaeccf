"""One decode step of the default model on the CPU, and the paged-attention kernel's share of it.

    python benchmarks/bench_decode_step.py [--batch 64] [--context 220] [--repeats 7]
                                           [--block-order contiguous|scattered]
                                           [--prefills 2 --prefill-len 200]
                                           [--kernels cpu|torch]
                                           [--dtype bfloat16|float32] [--bf16-weights]
                                           [--linears c torch]
                                           [--quantization none int8 w8a8_int8 gguf
                                                           gguf-float-x]
                                           [--kv-cache-dtype auto fp8_e4m3 fp8_e5m2]
                                           [--graphs]

The embedded SmolLM2-135M-Instruct in bfloat16 (`--dtype`) with the `cpu` kernel set, a batch of
`--batch` sequences of about `--context` tokens each (contexts spread by +-20), each decoding
one token: the model's forward pass and its logits, as the executor runs a decode step. The
attention kernel is timed inside the forward pass (every call to
`pagedserve.kernels.cpu_kernels.paged_decode_attention_cpu`), so its figure is what it costs between
the matmuls, with the KV cache (30 layers) streamed from memory as in serving, not hot in cache as
a kernel-only loop would have it. Prints the median over `--repeats` rounds of 5 steps.
Block tables are contiguous runs of blocks by default; `--block-order scattered` deals every
sequence random blocks of the pool, as a serving pool's tables are once its blocks have been
freed and reused a few times. `--prefills N` makes the last N sequences of the batch prompts of
`--prefill-len` tokens computed in the step (a mixed step, as continuous batching runs them);
the attention figure then covers their prefill attention too. `--kernels torch` runs the
PyTorch path instead (the reference the C kernels replace on the CPU), its attention timed as
one call of the set's `paged_attention` per layer.

`--quantization` names one or more weight modes (none: bf16 weights, the GGUF dequantized at
load; int8, w8a8_int8: those linear layers quantized as `--quantization` does it; gguf: the
GGUF's Q4_1 and Q8_0 weights run natively, as the engine serves the default model, by
activations rounded to 16-bit integers where the kernels do so (AVX2 CPUs, up to 8 rows);
gguf-float-x: the same weights by the activations as they are) and
`--kv-cache-dtype` one or more cache dtypes (auto: bf16; fp8_e4m3, fp8_e5m2); each pair of
them is a mode with its own copy of the model and cache over the same batch, and the modes are
timed alternately, round by round, in one process, so that their figures share the machine's
state. The first mode is the baseline the others are reported against.

`--linears` names one or more ways to run the float (unquantized) linear layers, each a mode
too: c, the kernel set's own packed matmuls (default: bf16_linear.c or oneDNN for bfloat16 on
AVX-512 CPUs, float_linear on CPUs without AVX-512); torch, PyTorch's matmul on the plain
weight (the baseline: MKL for float32). `--bf16-weights` rounds the float checkpoint's
weights to bfloat16 before anything else, as a bfloat16 checkpoint served in `--dtype float32`
holds them (float_linear then stores them in half the bytes).

`--graphs` adds, for each mode, its step replayed from a CPU graph (executor decode_graphs.py:
the forward pass recorded once as its kernel calls) on the same model, timed in turn with the
others; decode-only batches and the cpu kernels only. A replay calls the kernels without their
Python wrappers, so its attention is not timed ("-"); the report says how long its capture
took (the step run once while recorded: what the first decode step of a batch size costs a
server, which captures each size on first use).

To compare two versions of the kernels, run this script from each checkout, alternating
(`git worktree add /tmp/old <commit>; cd /tmp/old && python <this script>`); each checkout
builds its own kernel library (named by the hash of its sources).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import statistics
import time

import torch

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
from pagedserve.executor.bootstrap import pick_kv_dtype
from pagedserve.executor.decode_graphs import CpuCapture, DecodeGraphs
from pagedserve.executor.kv_cache import allocate_kv_cache
from pagedserve.executor.model_files import default_cache_dir, resolve_model
from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import Linear, bind_kernels, quantize_linears
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.attention import FP8_DTYPES
from pagedserve.kernels.dispatch import TORCH_KERNELS
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.kernels.quantization import SCHEMES

STEPS_PER_ROUND = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-order", choices=["contiguous", "scattered"],
                        default="contiguous")
    parser.add_argument("--prefills", type=int, default=0)
    parser.add_argument("--prefill-len", type=int, default=200)
    parser.add_argument("--kernels", choices=["cpu", "torch"], default="cpu")
    parser.add_argument("--quantization", nargs="+", default=["none"],
                        choices=["none", *SCHEMES, "gguf", "gguf-float-x"])
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                        choices=["auto", *FP8_DTYPES])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--bf16-weights", action="store_true")
    parser.add_argument("--linears", nargs="+", default=["c"], choices=["c", "torch"])
    parser.add_argument("--graphs", action="store_true")
    args = parser.parse_args()
    if args.graphs and (args.prefills or args.kernels != "cpu"):
        parser.error("--graphs replays decode-only steps of the cpu kernels")

    longest = max(args.context + 20, args.prefill_len if args.prefills else 0)
    blocks_per_seq = longest // args.block_size + 2
    num_blocks = args.batch * blocks_per_seq
    blocks = list(range(num_blocks))
    if args.block_order == "scattered":
        random.Random(0).shuffle(blocks)
    decodes = args.batch - args.prefills
    batch = build_flat_batch([
        ScheduledSequence([5] if i < decodes else [5] * args.prefill_len,
                          args.context + i % 41 - 20 if i < decodes else 0,
                          blocks[i * blocks_per_seq:(i + 1) * blocks_per_seq])
        for i in range(args.batch)], args.block_size)

    attention_s = [0.0]

    def timed(kernel):
        def timed_kernel(*call_args, **kwargs):
            start = time.perf_counter()
            out = kernel(*call_args, **kwargs)
            attention_s[0] += time.perf_counter() - start
            return out
        return timed_kernel
    if args.kernels == "torch":
        kernels = dataclasses.replace(TORCH_KERNELS,
                                      paged_attention=timed(TORCH_KERNELS.paged_attention))
    else:
        # Decodes (and, token by token, prefills), and prefills by tiles where this checkout
        # has it.
        for name in ("paged_decode_attention_cpu", "paged_prefill_attention_cpu"):
            if hasattr(cpu_kernels, name):
                setattr(cpu_kernels, name, timed(getattr(cpu_kernels, name)))
        kernels = cpu_kernel_set()

    def eager_step(model):
        return lambda: model.compute_logits(model(batch.input_ids, batch.positions,
                                                  batch.meta)[batch.last_token_rows])

    captures = {}

    def graph_step(model, mode):
        with torch.inference_mode():
            eager_step(model)()  # what a first pass does once (packing, caches) is not capture
        graphs = DecodeGraphs(model, [args.batch], blocks_per_seq * args.block_size,
                              args.block_size, torch.device("cpu"), CpuCapture())
        captures[mode] = graphs.capture_seconds
        return lambda: model.compute_logits(graphs.run(batch)[batch.last_token_rows])

    dtype = getattr(torch, args.dtype)
    steps_of = {}
    for quantization, kv_cache_dtype, linears in itertools.product(
            args.quantization, args.kv_cache_dtype, args.linears):
        native = quantization.startswith("gguf")
        model_dir = resolve_model(None, default_cache_dir(), gguf_dequantize=not native)
        model = load_model(model_dir.path, dtype)
        if quantization == "gguf-float-x":
            for module in model.modules():
                if isinstance(module, Linear):
                    module.quantized = dataclasses.replace(module.quantized,
                                                           int16_activations=False)
        if args.bf16_weights:
            for parameter in model.parameters():
                parameter.data = parameter.data.to(torch.bfloat16).to(dtype)
        if quantization in SCHEMES:
            quantize_linears(model, quantization)
        allocate_kv_cache(model, num_blocks, args.block_size,
                          pick_kv_dtype(kv_cache_dtype, dtype), torch.device("cpu"))
        bind_kernels(model, kernels if linears == "c" else
                     dataclasses.replace(kernels, pack_linear=None, packed_linear=None))
        mode = f"quantization {quantization}, kv {kv_cache_dtype}"
        if len(args.linears) > 1:
            mode += f", linears {linears}"
        steps_of[mode] = eager_step(model)
        if args.graphs:
            steps_of[f"{mode}, graphs"] = graph_step(model, f"{mode}, graphs")

    steps = {mode: [] for mode in steps_of}
    attention = {mode: [] for mode in steps_of}
    with torch.inference_mode():
        for round_index in range(args.repeats + 1):  # round 0 warms up
            order = list(steps_of) if round_index % 2 else list(steps_of)[::-1]
            for mode in order:
                attention_s[0] = 0.0
                start = time.perf_counter()
                for _ in range(STEPS_PER_ROUND):
                    steps_of[mode]()
                if round_index:
                    steps[mode].append((time.perf_counter() - start) / STEPS_PER_ROUND)
                    attention[mode].append(attention_s[0] / STEPS_PER_ROUND)
    first = next(iter(steps_of))
    step_base = statistics.median(steps[first])
    attention_base = statistics.median(attention[first])
    for mode in steps_of:
        step, attended = statistics.median(steps[mode]), statistics.median(attention[mode])
        timed_attention = f"- (captured in {captures[mode] * 1e3:.0f} ms)" \
            if mode in captures else f"{attended * 1e3:.1f} ms ({attended / attention_base:.2f}x)"
        weights = " (weights rounded to bfloat16)" if args.bf16_weights else ""
        print(f"{args.kernels} kernels, {args.dtype}{weights}, {mode}, batch {args.batch} "
              f"({args.prefills} prefills of {args.prefill_len} tokens), "
              f"context ~{args.context}, {args.block_order} blocks, "
              f"threads {torch.get_num_threads()}: "
              f"step {step * 1e3:.1f} ms ({step / step_base:.2f}x), "
              f"attention {timed_attention} "
              f"(medians of {args.repeats} x {STEPS_PER_ROUND} steps; ratios to {first})")


if __name__ == "__main__":
    main()
