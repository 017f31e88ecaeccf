"""Every Triton kernel the executor launches, compiled for a GPU this machine need not have
(default sm_90: the H100 and H200 that devices are lent as), with each variant's registers,
spilled bytes and shared memory.

    PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels \
        python3 benchmarks/compile_triton_kernels.py [--arch 90] [--json out.json]

Why: the test suite runs the Triton kernels under the interpreter (TRITON_INTERPRET=1), which
accepts programs the compiler rejects, and a GPU is lent rarely. Here each kernel goes through
Triton's whole compiler (front end, TTGIR passes, PTX, the wheel's own ptxas) for the target,
launched through its real wrapper on CPU tensors, so that the arguments are specialised
(alignment, constexprs) as on a GPU. Launches only compile: a stand-in driver names the target
and `JITFunction.run` warms up instead of launching. Both are Triton internals (3.x, checked
on 3.9); if they change, every launch fails with the error Triton raised, and the script with
them. A variant that needs more shared memory than the target
has, which fails at launch on the GPU, is an error here too.

Launch shapes: what the wrappers choose on the target (its traits stood in for
`triton_attention.gpu`: tiles fitted to its shared memory, split-K, e4m3 conversion), for a
LLaMA-3-8B-shaped layer (32 query heads, 8 KV heads, head size 128, blocks of 16, bf16) plus the
other head sizes, dtypes and options the executor can ask for, and bench_kernels_gpu.py's
candidate tiles (what the next device run will time).

Exit status 1 if any variant fails to compile or does not fit. Resource figures are static:
they say nothing of speed, which only a GPU measures (bench_kernels_gpu.py).
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") == "1":  # triton.jit must build compilable kernels
    raise SystemExit("compile_triton_kernels.py: unset TRITON_INTERPRET (it makes triton.jit "
                     "build interpreted kernels)")

import argparse
import contextlib
import json
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from pagedserve.kernels import triton_attention as attention
from pagedserve.kernels.quantization import GroupedWeight, Int8Weight
from pagedserve.kernels.triton_activation import silu_and_mul_triton
from pagedserve.kernels.triton_moe import fused_moe_triton
from pagedserve.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton
from pagedserve.kernels.triton_quantization import pack_quantized_triton, quantized_linear_triton
from pagedserve.kernels.triton_rotary import apply_rotary_triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_kernels_gpu import DECODE_CANDIDATES, PREFILL_CANDIDATES  # noqa: E402

# What the launch choices read of each target (attention.gpu): an A100, an A40, an L40S and an
# H100/H200; shared memory a program may opt into, from CUDA's tables.
TARGETS = {80: attention.Gpu(108, 166912, native_e4m3=False),
           86: attention.Gpu(84, 101376, native_e4m3=False),
           89: attention.Gpu(142, 101376, native_e4m3=True),
           90: attention.Gpu(132, 232448, native_e4m3=True)}
BLOCK = 16
HEADS, KV_HEADS = 32, 8


@dataclass
class Compiled:
    variant: str
    kernel: str
    registers: int | None = None
    spilled_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None


class CompileOnlyDriver:
    """What JITFunction.run asks of Triton's driver, answered for a GPU that is not here."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def compiling_only(arch: int) -> Iterator[list[tuple[str, object]]]:
    """Inside, a Triton launch compiles its kernel for sm_`arch` and returns without running
    it, and the wrappers choose their launches for that GPU; yields the list of (kernel name,
    compiled kernel) filled as kernels compile."""
    compiled: list[tuple[str, object]] = []
    launch, device_traits = JITFunction.run, attention.gpu

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    previous = driver._active  # reset_active() would look for a GPU
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    attention.gpu = lambda device: TARGETS[arch]
    try:
        yield compiled
    finally:
        JITFunction.run, attention.gpu = launch, device_traits
        driver._active = previous


def resources(kernel) -> tuple[int, int]:
    """(registers per thread, bytes spilled to the stack) from the cubin's resource usage."""
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name],
                                capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report!r}")
    return int(usage[1]), int(usage[2])


def zeros(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def attention_variants() -> dict[str, Callable[[], object]]:
    """Decode and prefill launches, named; the wrappers choose tiles and split-K as on the
    target, except where a variant names its tiles."""
    variants: dict[str, Callable[[], object]] = {}

    def caches(head_dim: int, dtype: torch.dtype,
               kv_heads: int = KV_HEADS) -> tuple[torch.Tensor, torch.Tensor]:
        return zeros(64, BLOCK, kv_heads, head_dim, dtype=dtype), zeros(
            64, BLOCK, kv_heads, head_dim, dtype=dtype)

    def decode(num_seqs=64, context=1024, head_dim=128, dtype=torch.bfloat16, cache=None,
               tiles=attention.DECODE_TILES, window=None, softcap=None):
        key_cache, value_cache = caches(head_dim, cache or dtype)
        return lambda: attention.paged_attention_decode_triton(
            zeros(num_seqs, HEADS, head_dim, dtype=dtype), key_cache, value_cache,
            zeros(num_seqs, 8, dtype=torch.int32), zeros(num_seqs, dtype=torch.int32), 0.1,
            window, max_seq_len=context, tiles=tiles, softcap=softcap)

    def prefill(tokens=512, head_dim=128, dtype=torch.bfloat16, cache=None, tiles=None,
                window=None, softcap=None, fresh=False, heads=HEADS, kv_heads=KV_HEADS):
        key_cache, value_cache = caches(head_dim, cache or dtype, kv_heads)
        fresh_kv = (zeros(2 * tokens, kv_heads, head_dim, dtype=dtype),) * 2 if fresh else None
        return lambda: attention.paged_attention_prefill_triton(
            zeros(2 * tokens, heads, head_dim, dtype=dtype), key_cache, value_cache,
            zeros(2, 8, dtype=torch.int32), zeros(2, dtype=torch.int32),
            torch.tensor([0, tokens, 2 * tokens], dtype=torch.int32), 0.1, window,
            max_query_len=tokens, tiles=tiles, softcap=softcap, fresh_kv=fresh_kv)

    fp8 = torch.float8_e4m3fn
    variants["decode 64 x 1k"] = decode()
    variants["decode 4 x 4k (split-K)"] = decode(num_seqs=4, context=4096)
    variants["decode fp8 e4m3 cache"] = decode(cache=fp8)
    variants["decode fp8 e5m2 cache"] = decode(cache=torch.float8_e5m2)
    variants["decode window + softcap"] = decode(window=4096, softcap=50.0)
    variants["decode head 64 fp16"] = decode(head_dim=64, dtype=torch.float16)
    variants["decode head 256 bf16"] = decode(head_dim=256)
    variants["decode head 256 fp32, split-K"] = decode(num_seqs=4, context=4096, head_dim=256,
                                                       dtype=torch.float32)
    for tiles in DECODE_CANDIDATES[1:]:
        variants[f"decode 4 x 4k {tiles}"] = decode(num_seqs=4, context=4096, tiles=tiles)
    for tokens in (4, 16, 512):
        variants[f"prefill {tokens} tokens"] = prefill(tokens)
        variants[f"prefill {tokens} tokens varlen"] = prefill(tokens, fresh=True)
    variants["prefill fp8 e4m3 cache"] = prefill(cache=fp8)
    variants["prefill window + softcap"] = prefill(window=4096, softcap=50.0)
    variants["prefill head 64 fp16"] = prefill(head_dim=64, dtype=torch.float16)
    variants["prefill head 256 bf16"] = prefill(head_dim=256)
    variants["prefill head 256 fp32"] = prefill(head_dim=256, dtype=torch.float32)
    variants["prefill multi-query, 71 heads (Falcon-7B)"] = prefill(head_dim=64, heads=71,
                                                                   kv_heads=1)
    for tiles in PREFILL_CANDIDATES:
        variants[f"prefill {tiles}"] = prefill(tiles=tiles)
    return variants


def layer_variants() -> dict[str, Callable[[], object]]:
    """The norms, rotary, activation, quantized linears and experts, bf16, 8B-shaped."""
    hidden, inter = 4096, 14336
    x = zeros(8, hidden)
    variants: dict[str, Callable[[], object]] = {
        "write_kv_cache": lambda: attention.write_kv_cache_triton(
            zeros(8, KV_HEADS, 128), zeros(8, KV_HEADS, 128), zeros(4, BLOCK, KV_HEADS, 128),
            zeros(4, BLOCK, KV_HEADS, 128), zeros(8, dtype=torch.int64)),
        "rms_norm": lambda: rms_norm_triton(x, zeros(hidden), 1e-6),
        "add_rms_norm": lambda: add_rms_norm_triton(x, zeros(8, hidden), zeros(hidden), 1e-6),
        "silu_and_mul": lambda: silu_and_mul_triton(zeros(8, 2 * inter)),
        "fused_moe (8 experts, top 2)": lambda: fused_moe_triton(
            zeros(8, 1024), zeros(8, 2 * 512, 1024), zeros(8, 1024, 512), zeros(8, 2),
            torch.arange(16).view(8, 2) % 8, silu_and_mul_triton),
        "int8 linear (W8A16)": lambda: quantized_linear_triton(
            x, Int8Weight(zeros(hidden, hidden, dtype=torch.int8),
                          zeros(hidden, dtype=torch.float32)), None),
    }
    for neox in (True, False):
        variants[f"rotary neox={neox}"] = lambda neox=neox: apply_rotary_triton(
            zeros(8, HEADS, 128), zeros(8, dtype=torch.int64),
            zeros(4096, 128, dtype=torch.float32), neox)
    for bits, group in ((4, 128), (4, 32), (5, 32), (6, 16), (8, 32)):
        weight = GroupedWeight(zeros(hidden, hidden, dtype=torch.int8),
                               zeros(hidden, hidden // group, dtype=torch.float32),
                               zeros(hidden, hidden // group, dtype=torch.float32))
        variants[f"grouped linear {bits}-bit g={group}"] = (
            lambda weight=weight: quantized_linear_triton(x, pack_quantized_triton(weight),
                                                          None))
    return variants


def compile_all(arch: int) -> list[Compiled]:
    shared = TARGETS[arch].shared_memory
    results = []
    variants = {**attention_variants(), **layer_variants()}
    for name, launch in variants.items():
        with compiling_only(arch) as compiled:
            try:
                launch()
            except Exception as error:  # noqa: BLE001 - each variant's failure is reported
                results.append(Compiled(name, "", error=f"{type(error).__name__}: {error}"))
                print(f"FAIL {name}: {results[-1].error}", flush=True)
                continue
        for kernel_name, kernel in compiled:
            registers, spilled = resources(kernel)
            result = Compiled(name, kernel_name, registers, spilled, kernel.metadata.shared)
            if result.shared_bytes > shared:
                result.error = f"needs {result.shared_bytes} bytes of shared memory of {shared}"
            results.append(result)
            print(f"{'FAIL' if result.error else 'ok  '} {name:<44} {kernel_name:<34} "
                  f"regs {registers:3}  spilled {spilled:5} B  shared {result.shared_bytes:6} B",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(TARGETS),
                        help="compute capability, e.g. 90 for sm_90 (H100, H200)")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args()
    results = compile_all(args.arch)
    if args.json:
        args.json.write_text(json.dumps(
            dict(arch=args.arch, triton=triton.__version__, torch=torch.__version__,
                 kernels=[asdict(r) for r in results]), indent=1))
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} compiled for sm_{args.arch}, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
