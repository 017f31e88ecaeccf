"""The CPU kernels in C (kernels/pagedserve/kernels/csrc): the KV cache write, paged attention that
reads K/V in place through the block tables, RMSNorm, fused add + RMSNorm, SiLU-and-mul and rotary
embedding, each a drop-in for its PyTorch path (float32 or bfloat16 CPU tensors).

Why C: on the CPU the PyTorch decode path gathers every sequence's K/V into a contiguous copy
and runs scaled_dot_product_attention on one query row per head, dominated by per-call overhead
rather than arithmetic, and the layers' elementwise work is a chain of small ops (a norm is
seven) that each pass over memory. The C kernels do each in one pass, vectorised for the
machine they are built on (the figures: docs/performance.md, "Why the CPU kernels are C").

The library is compiled at first use with the machine's C compiler (`cc`, or $CC) into
$XDG_CACHE_HOME/pagedserve/kernels (or ~/.cache/pagedserve/kernels), named by the hash of its
source, its flags and what `-march` resolves to on this machine (the compiler's predefined
macros: a cache shared by machines of different CPUs, an image's or a network home, never hands
one a build with instructions it lacks), so later starts load it at once. The kernels are
written for AVX-512 (BF16, VNNI) where the CPU has it, with portable C elsewhere (AVX2
machines: the compiler vectorizes it); $PAGEDSERVE_CPU_KERNELS_MARCH builds for another
`-march` than `native` (the tests build `x86-64-v3`, AVX2, to check the portable paths on an
AVX-512 machine). With no compiler, `available()` is False and
kernels/pagedserve/kernels/dispatch.py keeps the PyTorch path. Loading checks the ctypes mirrors
of the C structs against the layouts the library reports (`check_layout`) and raises where they
disagree.

Every kernel is called through `_library()`, with only tensors' data pointers, integers, floats
and ctypes objects as arguments: that is what lets a decode step be recorded as its list of
kernel calls and replayed without Python (`recording`, cpu_graph.py), and what lets a benchmark
point the wrappers at another revision's build (`build_library` of its sources, `open_library`,
`library_in_use`: benchmarks/ab_cpu_kernels.py). Queries about the build (`available`,
`prefill_tiles_supported`, `bf16_linear_supported`) read `_loaded_library()`, which is never
recorded.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, NoReturn

import structlog
import torch

from pagedserve.kernels.attention import AttentionMetadata
from pagedserve.kernels.quantization import (
    SIX_BIT_BIAS,
    GroupedWeight,
    Int8Weight,
    QuantizedWeight,
    dequantize_groups,
    int8_linear,
    quantized_linear,
    tensor_bytes,
    value_bits,
)

log = structlog.get_logger(__name__)

SOURCE_DIR = pathlib.Path(__file__).parent / "csrc"
SOURCES = [SOURCE_DIR / "attention.c", SOURCE_DIR / "layers.c", SOURCE_DIR / "int8_linear.c",
           SOURCE_DIR / "bf16_linear.c"]
# Reassociation lets the dot products over head_dim vectorise; finite-math is left off, since
# the kernel relies on -inf (masked softmax) and NaN (bf16 rounding).
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math"]
# The instruction set the library is built for: `native` unless this names another -march.
MARCH_ENV = "PAGEDSERVE_CPU_KERNELS_MARCH"
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# A KV cache's storage formats (FORMAT_* in csrc/common.h): the queries' dtype, or fp8.
KV_FORMATS = {**DTYPES, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}


class _DecodeShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_seqs", "num_heads", "num_kv_heads", "head_dim", "block_size", "table_stride",
        "q_stride_s", "q_stride_h", "o_stride_s", "o_stride_h",
        "kv_stride_b", "kv_stride_t", "kv_stride_h", "bf16", "kv_format", "window")] + [
        (name, ctypes.c_float) for name in ("scale", "k_scale", "v_scale", "softcap")]


def check_layout(c_struct: str, mirror: type[ctypes.Structure], size: int,
                 fields: Sequence[tuple[str, int, int]]) -> None:
    """Raise RuntimeError, naming the struct and field, where the ctypes `mirror` of the C struct
    `c_struct` disagrees with the layout the library reports: its `size` (sizeof) and `fields`
    (each one's name, offset and size, from `_c_layout`).

    Why: the mirrors are written by hand, and a C struct changed without its mirror (or the
    reverse) makes the kernels read their arguments from the wrong bytes, silent memory
    corruption. Checked when the library loads, such drift fails loudly instead. Fields are
    matched by name (two of one type swapped move no offset in a positional check) and their
    sizes compared too (padding can absorb a changed type without moving any offset)."""
    def fail(what: str) -> NoReturn:
        raise RuntimeError(f"the C struct {c_struct} and its ctypes mirror {mirror.__name__} in "
                           f"{__name__} disagree: {what}; make the mirror match the C struct")

    mirrored = {name for name, *_ in mirror._fields_}
    if len(fields) != len(mirrored):
        fail(f"{len(fields)} fields in C, {len(mirrored)} in the mirror")
    for name, offset, field_size in fields:
        if name not in mirrored:
            fail(f"field {name!r} is not in the mirror")
        field = getattr(mirror, name)
        if (field.offset, field.size) != (offset, field_size):
            fail(f"field {name!r} is {field_size} bytes at offset {offset} in C, {field.size} "
                 f"bytes at offset {field.offset} in the mirror")
    if ctypes.sizeof(mirror) != size:
        fail(f"sizeof is {size} in C, {ctypes.sizeof(mirror)} in the mirror")


def _c_layout(library: ctypes.CDLL, symbol: str) -> tuple[int, list[tuple[str, int, int]]]:
    """The layout the library's `const char *symbol(const int64_t **layout)` reports
    (decode_shape_layout in attention.c): sizeof, and each field's name, offset and size."""
    function = getattr(library, symbol)
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_int64))]
    values = ctypes.POINTER(ctypes.c_int64)()
    names = function(ctypes.byref(values)).decode().split()
    return values[0], [(name, values[1 + 2 * i], values[2 + 2 * i])
                       for i, name in enumerate(names)]


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "pagedserve" / "kernels"


def _compile(compiler: str, flags: list[str], target: pathlib.Path,
             sources: list[pathlib.Path]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent first starts never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        subprocess.run([compiler, *flags, "-o", str(built), *map(str, sources)], check=True,
                       capture_output=True, text=True)
        built.replace(target)


def _target_macros(compiler: str, march: str) -> str:
    """What `-march` resolves to here: the compiler's predefined macros (__AVX512F__, ...)."""
    return subprocess.run([compiler, march, "-dM", "-E", "-"], input="", check=True,
                          capture_output=True, text=True).stdout


def build_library(source_dir: pathlib.Path = SOURCE_DIR) -> pathlib.Path | None:
    """The kernels of `source_dir` (SOURCES' names there) built for this machine, in the cache
    under the digest of their sources, compiler and target; None when they cannot be built
    (no C compiler, or it failed: logged)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU kernels are not built; the PyTorch path runs")
        return None
    flags = [f"-march={os.environ.get(MARCH_ENV) or 'native'}", *FLAGS]
    sources = [source_dir / source.name for source in SOURCES]
    try:
        digest = hashlib.sha256(" ".join([compiler, *flags]).encode())
        digest.update(_target_macros(compiler, flags[0]).encode())
        for source in sorted(source_dir.iterdir()):
            digest.update(source.read_bytes())
        target = _cache_dir() / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
        if not target.exists():
            _compile(compiler, flags, target, sources)
            log.info("built the CPU kernels", path=str(target), flags=flags)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("building the CPU kernels failed; the PyTorch path runs",
                    compiler=compiler, error=detail.strip()[-2000:])
        return None
    return target


def open_library(path: pathlib.Path) -> ctypes.CDLL:
    """A built kernel library, its functions' signatures declared and its struct layouts
    checked against this module's mirrors."""
    library = ctypes.CDLL(str(path))
    check_layout("DecodeShape", _DecodeShape, *_c_layout(library, "decode_shape_layout"))
    for attention in (library.paged_decode_attention, library.paged_prefill_attention):
        attention.restype = ctypes.c_int
        attention.argtypes = [ctypes.c_void_p] * 6 + [ctypes.POINTER(_DecodeShape)]
    library.prefill_tiles_supported.argtypes = [ctypes.c_int64]
    # The kernels that return nothing say so: a recorded call's result is its status
    # (nonzero: failed), read by its replay.
    for kernel in (library.write_kv_cache, library.rms_norm, library.silu_and_mul,
                   library.rotary):
        kernel.restype = None
    library.bf16_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.write_kv_cache.argtypes = [ptr] * 5 + [i64] * 9 + [ctypes.c_float] * 2
    library.rms_norm.argtypes = [ptr] * 5 + [i64] * 4 + [ctypes.c_float, i64]
    library.silu_and_mul.argtypes = [ptr, ptr] + [i64] * 4
    library.rotary.argtypes = [ptr] * 4 + [i64] * 8
    if library.int8_linear_simd():
        library.int8_linear_w8a8.argtypes = [ptr] * 5 + [i64] * 5 + [ctypes.c_float]
        library.int8_linear_w8a16.argtypes = [ptr] * 5 + [i64] * 4
    else:
        library.w8a8_activations.argtypes = [ptr] * 2 + [i64] * 4 + [ctypes.c_float]
        library.w8a8_activations.restype = None
    library.grouped_linear.argtypes = [ptr] * 3 + [i64] + [ptr] * 2 + [i64] * 2 + [ptr] + [i64] * 6
    library.float_linear.argtypes = [ptr] * 3 + [i64, ptr] + [i64] * 5
    return library


@functools.cache
def _loaded_library() -> ctypes.CDLL | None:
    path = build_library()
    return None if path is None else open_library(path)


# A kernel call as recorded: the ctypes function and its arguments.
KernelCall = tuple[Callable[..., int | None], tuple]


class _RecordingLibrary:
    """The library while `recording` runs: a kernel called from the recording thread runs and
    is appended to `calls`; other threads' calls run unrecorded."""

    def __init__(self, library: ctypes.CDLL, calls: list[KernelCall]):
        self.library, self.calls, self.thread = library, calls, threading.get_ident()

    def __getattr__(self, name: str) -> Callable[..., int | None]:
        kernel = getattr(self.library, name)
        if threading.get_ident() != self.thread:
            return kernel

        def record(*args):
            self.calls.append((kernel, args))
            return kernel(*args)
        return record


_recording: _RecordingLibrary | None = None
_substitute: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL | _RecordingLibrary | None:
    """The library the kernel wrappers call (recorded while `recording` runs; another build
    while `library_in_use` runs)."""
    return _recording or _substitute or _loaded_library()


@contextlib.contextmanager
def library_in_use(library: ctypes.CDLL) -> Iterator[None]:
    """The wrappers call `library` (an `open_library`, of other sources: another revision's,
    for benchmarks/ab_cpu_kernels.py) while the block runs."""
    global _substitute
    previous, _substitute = _substitute, library
    try:
        yield
    finally:
        _substitute = previous


@contextlib.contextmanager
def recording(calls: list[KernelCall]) -> Iterator[None]:
    """Append every kernel call of this thread to `calls` (in order) while the block runs;
    the calls still run. One recording at a time."""
    global _recording
    library = _loaded_library()
    if library is None:
        raise RuntimeError("the CPU kernels are not available: nothing to record")
    if _recording is not None:
        raise RuntimeError("the CPU kernels are already being recorded")
    _recording = _RecordingLibrary(library, calls)
    try:
        yield
    finally:
        _recording = None


def available() -> bool:
    """True when the C kernels are built (or could be built now) and loaded."""
    return _loaded_library() is not None


def _built_with(query: str) -> bool:
    """What the library's `query` function (int query(void)) says of its build; False
    without a library."""
    library = _loaded_library()
    return library is not None and bool(getattr(library, query)())


def _attention_shape(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     tables: torch.Tensor, out: torch.Tensor, num_tasks: int, scale: float,
                     sliding_window: int | None, k_scale: float, v_scale: float,
                     softcap: float | None) -> _DecodeShape:
    """The C kernels' view of the tensors, checked: `num_tasks` sequences (or tiles)."""
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert query.dtype in DTYPES and key_cache.dtype == value_cache.dtype
    assert key_cache.dtype in (query.dtype, torch.float8_e4m3fn, torch.float8_e5m2)
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert query.stride(-1) == 1 and num_heads % num_kv_heads == 0
    assert out.dtype == query.dtype and out.stride(-1) == 1
    return _DecodeShape(
        num_seqs=num_tasks, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, table_stride=tables.stride(0), q_stride_s=query.stride(0),
        q_stride_h=query.stride(1), o_stride_s=out.stride(0), o_stride_h=out.stride(1),
        kv_stride_b=key_cache.stride(0), kv_stride_t=key_cache.stride(1),
        kv_stride_h=key_cache.stride(2), bf16=DTYPES[query.dtype],
        kv_format=KV_FORMATS[key_cache.dtype], window=sliding_window or 0, scale=scale,
        k_scale=k_scale, v_scale=v_scale, softcap=softcap or 0.0)


def paged_decode_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float,
                               sliding_window: int | None = None,
                               out: torch.Tensor | None = None, k_scale: float = 1.0,
                               v_scale: float = 1.0,
                               softcap: float | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence; the arguments and result as
    `triton_attention.paged_attention_decode_triton` (float32 or bfloat16 queries, a cache of
    their dtype or of fp8 with its scales, CPU)."""
    library = _library()
    assert library is not None, "the CPU kernels are not available"
    if out is None:
        out = torch.empty_like(query)
    tables = _int64(block_tables)
    lens = _int64(seq_lens)
    shape = _attention_shape(query, key_cache, value_cache, tables, out, query.shape[0], scale,
                             sliding_window, k_scale, v_scale, softcap)
    if query.shape[0] and library.paged_decode_attention(
            out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            tables.data_ptr(), lens.data_ptr(), ctypes.byref(shape)):
        raise MemoryError("CPU decode attention: out of memory for its scratch buffers")
    return out


def paged_prefill_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                                sliding_window: int | None, out: torch.Tensor,
                                k_scale: float = 1.0, v_scale: float = 1.0,
                                softcap: float | None = None) -> None:
    """The prefill tokens' attention into `out`, a tile of consecutive tokens of one request at
    a time (`meta.prefill_tiles`); only where `prefill_tiles_supported`."""
    tiles = meta.prefill_tiles
    tables = _int64(meta.block_tables)
    shape = _attention_shape(query, key_cache, value_cache, tables, out, tiles.shape[0], scale,
                             sliding_window, k_scale, v_scale, softcap)
    if _library().paged_prefill_attention(
            out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            tables.data_ptr(), tiles.data_ptr(), ctypes.byref(shape)):
        raise MemoryError("CPU prefill attention: out of memory for its scratch buffers")


@functools.cache  # asked by every attention layer of every step; fixed by the machine's CPU
def prefill_tiles_supported(head_dim: int) -> bool:
    """Whether this machine's kernels attend prefills by tiles for this head size (AVX-512,
    head_dim a multiple of 32)."""
    return bool(_loaded_library().prefill_tiles_supported(head_dim))


def write_kv_cache_cpu(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """As `attention.write_kv_cache` (key / value may be strided views, as the q/k/v
    split leaves them, with unit stride within a head)."""
    num_kv_heads, head_dim = key_cache.shape[2:]
    assert key.dtype == value.dtype and key.dtype in DTYPES
    assert key_cache.dtype == value_cache.dtype and key_cache.dtype in (
        key.dtype, torch.float8_e4m3fn, torch.float8_e5m2)
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    assert key.shape == value.shape == (slot_mapping.shape[0], num_kv_heads, head_dim)
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    slots = _int64(slot_mapping)
    _library().write_kv_cache(
        key_cache.data_ptr(), value_cache.data_ptr(), key.data_ptr(), value.data_ptr(),
        slots.data_ptr(), key.shape[0], num_kv_heads, head_dim, key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), DTYPES[key.dtype], KV_FORMATS[key_cache.dtype],
        k_scale, v_scale)


def paged_attention_cpu(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float,
                        sliding_window: int | None = None, k_scale: float = 1.0,
                        v_scale: float = 1.0, softcap: float | None = None,
                        fresh_kv: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """Drop-in for `attention.paged_attention`: decodes one query per sequence; prefills
    by tiles of consecutive tokens where the machine's kernels can
    (`prefill_tiles_supported`), else each prefill token as a one-query request over its causal
    context. (Both replace the PyTorch path's scaled_dot_product_attention over a gathered
    copy of the context; docs/performance.md, "Why the CPU kernels are C", compares the sets.)
    `fresh_kv` is not read: the C kernels read K/V in place in the cache, so the step's own
    rows would save no copy."""
    if meta.num_decodes == len(meta.query_lens) or not prefill_tiles_supported(
            query.shape[-1]):
        tables, lens = meta.token_contexts
        return paged_decode_attention_cpu(query, key_cache, value_cache, tables, lens, scale,
                                          sliding_window, k_scale=k_scale, v_scale=v_scale,
                                          softcap=softcap)
    out = torch.empty_like(query)
    decodes = meta.num_decodes
    if decodes:
        paged_decode_attention_cpu(query[:decodes], key_cache, value_cache,
                                   meta.block_tables[:decodes], meta.seq_lens[:decodes], scale,
                                   sliding_window, out=out[:decodes], k_scale=k_scale,
                                   v_scale=v_scale, softcap=softcap)
    paged_prefill_attention_cpu(query, key_cache, value_cache, meta, scale, sliding_window, out,
                                k_scale, v_scale, softcap)
    return out


# The wrappers below run a few hundred times a decode step, so they avoid what costs most in
# PyTorch's Python API: a view or reshape to a new shape (~1.5-4.5 us each) and torch.empty of a
# shape (~1.6-2.8 us, against ~1 for empty_like); a decode step of the default model spent
# about 2 ms in them.

def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the last dimension (a view when it can)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _int64(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous int64 (itself when it is one)."""
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of x's shape and dtype."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.dtype in DTYPES and weight.dtype == x.dtype and weight.is_contiguous()
    rows = _rows(x)
    res_rows = None if residual is None else _rows(residual)
    out = _empty_like(x)
    res_out = None if residual is None else _empty_like(x)
    _library().rms_norm(out.data_ptr(), 0 if res_out is None else res_out.data_ptr(),
                        rows.data_ptr(), 0 if res_rows is None else res_rows.data_ptr(),
                        weight.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0),
                        0 if res_rows is None else res_rows.stride(0), eps, DTYPES[x.dtype])
    return out, res_out


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As `norm.rms_norm`."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm_cpu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As `norm.add_rms_norm`: (rms_norm(x + residual), x + residual)."""
    assert residual.shape == x.shape and residual.dtype == x.dtype
    return _norm(x, residual, weight, eps)


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """As `activation.silu_and_mul`."""
    assert x.dtype in DTYPES
    rows = _rows(x)
    d = rows.shape[1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype)
    _library().silu_and_mul(out.data_ptr(), rows.data_ptr(), rows.shape[0], d, rows.stride(0),
                            DTYPES[x.dtype])
    return out


def apply_rotary_cpu(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     neox_style: bool = True) -> torch.Tensor:
    """As `rotary.apply_rotary`: x [num_tokens, num_heads, head_dim] (any strides but
    the last), cos_sin_cache [max_position, rotary_dim] float32. Returns a new tensor."""
    assert x.dtype in DTYPES and x.stride(-1) == 1
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
    tokens, heads, head_dim = x.shape
    out = _empty_like(x)
    pos = _int64(positions)
    _library().rotary(out.data_ptr(), x.data_ptr(), pos.data_ptr(), cos_sin_cache.data_ptr(),
                      tokens, heads, head_dim, cos_sin_cache.shape[1], x.stride(0),
                      x.stride(1), int(neox_style), DTYPES[x.dtype])
    return out


# Output channels per block of the packed bfloat16 layout (CHANNELS in bf16_linear.c), and
# per group of int8_linear.c's layouts (GROUP), float_linear's included.
BF16_CHANNELS = 16
INT8_GROUP = 16


@dataclasses.dataclass(frozen=True)
class _PackedFloat:
    """A float weight [out, in] repacked for one of our matmuls: `data` in blocks of
    `channels` output channels (the last zero-padded), each block k-major in steps of `step`
    consecutive values of k of each channel."""

    data: torch.Tensor
    out_features: int
    in_features: int
    channels: ClassVar[int]
    step: ClassVar[int]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data)

    def _lanes(self) -> torch.Tensor:
        """`data` as [blocks][in / step][channels][step]."""
        return self.data.view(self.data.shape[0], -1, self.channels, self.step)

    def to_dense(self) -> torch.Tensor:
        """The plain weight back (as a oneDNN-packed tensor's `to_dense`), exactly."""
        rows = self._lanes().movedim(2, 1).reshape(-1, self.in_features)
        return rows[:self.out_features].contiguous()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W in `dtype` (a tied embedding's lookup), read in the packed layout."""
        return self._lanes()[ids // self.channels, :, ids % self.channels].flatten(-2).to(dtype)


@dataclasses.dataclass(frozen=True)
class PackedBf16Weight(_PackedFloat):
    """A bfloat16 weight in bf16_linear.c's layout: `data` [ceil(out / 16)][in / 2][16][2]
    bfloat16 (each output channel's consecutive pairs of k side by side, channels padded with
    zeros to a multiple of 16)."""

    channels: ClassVar[int] = BF16_CHANNELS
    step: ClassVar[int] = 2


def bf16_linear_supported() -> bool:
    """Whether this machine's kernels include bf16_linear.c's matmul (AVX-512 BF16)."""
    return _built_with("bf16_linear_supported")


@dataclasses.dataclass(frozen=True)
class PackedFloatWeight(_PackedFloat):
    """A float weight for int8_linear.c's `float_linear` (CPUs without AVX-512): `data`
    [ceil(out / 16)][in][16], each block of 16 output channels k-major (zero-padded channels),
    in bfloat16 where every value is one exactly (a bfloat16 checkpoint served in float32: half
    the bytes, the same values), else float32; `dtype` the weight's own."""

    dtype: torch.dtype = torch.float32
    channels: ClassVar[int] = INT8_GROUP
    step: ClassVar[int] = 1

    def to_dense(self) -> torch.Tensor:
        """The weight back, exactly, in its own dtype."""
        return super().to_dense().to(self.dtype)


def int16_activations_supported() -> bool:
    """Whether this machine's grouped kernel multiplies 4-bit values by activations rounded to
    16-bit integers for weights that allow it (`GroupedWeight.int16_activations`; up to 8 rows,
    on CPUs without AVX-512: int8_linear.c's grouped_block_a16)."""
    return _built_with("grouped_int16_activations")


def float_linear_supported() -> bool:
    """Whether this machine's kernels include `float_linear` (built where the CPU has no
    AVX-512: the only CPUs it was measured on against PyTorch's float32 matmuls)."""
    return _built_with("float_linear_supported")


def _pack_bf16(weight: torch.Tensor) -> PackedBf16Weight:
    out_features, in_features = weight.shape
    padded = -(-out_features // BF16_CHANNELS) * BF16_CHANNELS
    rows = torch.cat([weight, weight.new_zeros(padded - out_features, in_features)])
    data = rows.view(-1, BF16_CHANNELS, in_features // 2, 2).permute(0, 2, 1, 3)
    return PackedBf16Weight(data.contiguous(), out_features, in_features)


def _pack_float(weight: torch.Tensor) -> PackedFloatWeight:
    as_bf16 = weight.to(torch.bfloat16)
    storage = as_bf16 if torch.equal(as_bf16.to(weight.dtype), weight) else weight
    blocks = -(-weight.shape[0] // INT8_GROUP)
    return PackedFloatWeight(_blocked(storage, blocks), *weight.shape, dtype=weight.dtype)


def pack_linear_cpu(
        weight: torch.Tensor) -> PackedBf16Weight | PackedFloatWeight | torch.Tensor | None:
    """A float weight [out, in] packed for `packed_linear_cpu`:
    - on CPUs without AVX-512 (`float_linear_supported`), a float32 or bfloat16 weight for
      `float_linear` (an `in` a multiple of 8; PackedFloatWeight);
    - a bfloat16 weight for bf16_linear.c on CPUs with AVX-512 BF16 (an even `in`), else in
      oneDNN's blocked layout where oneDNN has a bf16 path (AVX-512 or AVX-NE-CONVERT);
    None otherwise: float32 on AVX-512 CPUs goes to MKL, which gains nothing from packing."""
    out_features, in_features = weight.shape
    if weight.dtype in DTYPES and in_features % 8 == 0 and float_linear_supported():
        return _pack_float(weight)
    if weight.dtype != torch.bfloat16:
        return None
    if in_features % 2 == 0 and bf16_linear_supported():
        return _pack_bf16(weight)
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    # The batch-size hint only tunes the layout, not which batch sizes it serves.
    return torch.ops.mkldnn._reorder_linear_weight(weight, 64)


def packed_linear_cpu(x: torch.Tensor, packed: PackedBf16Weight | PackedFloatWeight | torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) with W from `pack_linear_cpu`."""
    if isinstance(packed, PackedFloatWeight):
        return _float_linear(x, packed, bias)
    if not isinstance(packed, PackedBf16Weight):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    rows = _rows(x)
    assert rows.dtype == torch.bfloat16 and rows.shape[1] == packed.in_features
    assert bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())
    n = packed.out_features
    out = torch.empty((*x.shape[:-1], n), dtype=torch.bfloat16)
    _library().bf16_linear(out.data_ptr(), rows.data_ptr(), packed.data.data_ptr(),
                           None if bias is None else bias.data_ptr(), rows.shape[0], n,
                           packed.in_features, rows.stride(0), n)
    return out


def _float_linear(x: torch.Tensor, packed: PackedFloatWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    return _weight_only_linear("float_linear", x, bias, packed.out_features, packed.in_features,
                               (packed.data.data_ptr(), packed.data.element_size() * 8))


def _weight_only_linear(kernel: str, x: torch.Tensor, bias: torch.Tensor | None,
                        out_features: int, in_features: int, weight_args: tuple,
                        options: tuple = ()) -> torch.Tensor:
    """x W^T (+ bias) by `kernel` (int8_linear.c's grouped_linear or float_linear, which
    share their arguments but W's: `weight_args`, and the kernel's own last ones: `options`,
    grouped_linear's int16_x), float32 or bfloat16 x and out."""
    assert x.dtype in DTYPES and x.shape[-1] == in_features
    assert bias is None or (bias.dtype == x.dtype and bias.is_contiguous())
    rows = _rows(x)
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype)
    failed = getattr(_library(), kernel)(
        out.data_ptr(), rows.data_ptr(), *weight_args, 0 if bias is None else bias.data_ptr(),
        rows.shape[0], out_features, in_features, rows.stride(0), DTYPES[x.dtype], *options)
    if failed:
        raise MemoryError(f"CPU {kernel}: out of memory for its scratch buffers")
    return out


@dataclasses.dataclass(frozen=True)
class PackedInt8Weight:
    """An `Int8Weight` in int8_linear.c's layout: `data` [ceil(N/16)][K4/4][16][4] int8 (K4: K
    rounded up to 4), `scales` float32 padded to ceil(N/16) * 16."""

    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int
    dynamic_activations: bool
    activation_levels: float

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data, self.scales)

    def plain(self) -> Int8Weight:
        k4 = self.data.shape[1] * 4
        rows = self.data.permute(0, 2, 1, 3).reshape(-1, k4)
        return Int8Weight(rows[:self.out_features, :self.in_features].contiguous(),
                          self.scales[:self.out_features].clone(), self.dynamic_activations,
                          self.activation_levels)


def int8_arithmetic_supported() -> bool:
    """Whether this machine's kernels include int8_linear.c's int8 matmuls (AVX-512 VNNI and
    BF16)."""
    return _built_with("int8_linear_simd")


@dataclasses.dataclass(frozen=True)
class GroupedInt8Weight:
    """An `Int8Weight` where the C kernels have no int8 matmul (`int8_arithmetic_supported`
    false: AVX2 and other CPUs): its values as 8-bit values of the grouped layout, one group
    per channel (`grouped`), which the portable grouped kernel sums in float32, a decode step's
    rows reading each weight byte once. W8A8's activations are quantized per token first, as
    `quantization.quantize_per_token` does, and multiplied back by their scales
    (`w8a8_activations` in int8_linear.c), so its outputs are W8A8's, to float32 rounding."""

    grouped: PackedGroupedWeight
    dynamic_activations: bool
    activation_levels: float

    @property
    def nbytes(self) -> int:
        return self.grouped.nbytes

    def plain(self) -> Int8Weight:
        plain = self.grouped.plain()
        return Int8Weight(plain.qweight, plain.scales[:, 0].contiguous(),
                          self.dynamic_activations, self.activation_levels)


def pack_int8_cpu(weight: Int8Weight) -> PackedInt8Weight | GroupedInt8Weight | Int8Weight:
    """`weight` in the C kernels' layout: int8_linear.c's (see PackedInt8Weight) where this
    machine has its int8 matmuls, else the grouped one (GroupedInt8Weight), or as it is where
    that cannot take it (K not a multiple of 8: the PyTorch path)."""
    if not int8_arithmetic_supported():
        grouped = pack_grouped_cpu(GroupedWeight(weight.qweight, weight.scales[:, None], None),
                                   bits=8)
        if not isinstance(grouped, PackedGroupedWeight):
            return weight
        return GroupedInt8Weight(grouped, weight.dynamic_activations, weight.activation_levels)
    qweight = weight.qweight
    n, k = qweight.shape
    groups, k4 = -(-n // INT8_GROUP), -(-k // 4) * 4
    padded = torch.zeros(groups * INT8_GROUP, k4, dtype=torch.int8)
    padded[:n, :k] = qweight
    data = padded.view(groups, INT8_GROUP, k4 // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = torch.zeros(groups * INT8_GROUP, dtype=torch.float32)
    scales[:n] = weight.scales
    return PackedInt8Weight(data, scales, n, k, weight.dynamic_activations,
                            weight.activation_levels)


@dataclasses.dataclass(frozen=True)
class PackedGroupedWeight:
    """A `GroupedWeight` in int8_linear.c's grouped layout, per block of 16 output channels,
    in the fewest bits its values need (`bits`, `value_bits`). `data`, per block:
    - 8-bit values: int8 [K][16], k-major;
    - 4-, 5- and 6-bit values (6-bit ones stored plus 32, `SIX_BIT_BIAS`, so that every
      stored value is unsigned): planes of bit fields, their low 4 bits first, then their high
      bits (1 or 2 a value). A plane of w-bit fields is 16-bit units [K / (32 / w)][16 c][2 p],
      unit (s, c, p) holding 16 / w values of channel c at bits w j .. w j + w - 1: value
      k = (32 / w) s + 2 j + p. So a 64-byte row of units, widened by no shuffle, holds each
      channel's pairs of k side by side, as vdpbf16ps takes them (int8_linear.c).
    `scales` and `offsets` [K/G][16], float16 where every factor is one exactly (GGUF's Q8_0,
    Q4_0, Q4_1, Q5_0 and Q5_1), else float32. Channels are padded to a multiple of 16 with
    zeros."""

    data: torch.Tensor
    bits: int
    scales: torch.Tensor
    offsets: torch.Tensor | None
    out_features: int
    in_features: int
    int16_activations: bool = False

    @property
    def group_size(self) -> int:
        return self.in_features * INT8_GROUP // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.data, self.scales,
                            *(() if self.offsets is None else (self.offsets,)))

    def _lanes(self) -> torch.Tensor:
        """`data` by channel: [blocks][K][16] bytes, or [blocks][units][16][2] 16-bit units."""
        blocks = self.data.shape[0]
        if self.bits == 8:
            return self.data.view(blocks, -1, INT8_GROUP)
        return self.data.view(torch.int16).view(blocks, -1, INT8_GROUP, 2)

    def plain(self) -> GroupedWeight:
        k, n = self.in_features, self.out_features
        lanes = self._lanes().movedim(2, 1)  # [blocks][16][bytes or units...]
        rows = _unpacked(lanes, self.bits, k).reshape(-1, k)
        return GroupedWeight(rows[:n].contiguous(), _unblocked(self.scales, n).float(),
                             None if self.offsets is None
                             else _unblocked(self.offsets, n).float(), self.int16_activations)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W, dequantized (a tied embedding's lookup), read in the packed layout."""
        block, lane = ids // INT8_GROUP, ids % INT8_GROUP

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, INT8_GROUP)[block, :, lane]

        values = _unpacked(self._lanes()[block, :, lane], self.bits, self.in_features)
        return dequantize_groups(values, take(self.scales).float(), None if self.offsets is None
                                 else take(self.offsets).float(), dtype)


# A narrow value's bit fields: (first bit, width) of its low 4 bits, and of its high bits
# for 5- and 6-bit values, each field kept in its own plane (PackedGroupedWeight).
def _fields(bits: int) -> list[tuple[int, int]]:
    return [(0, 4)] + ([(4, bits - 4)] if bits > 4 else [])


def _field_span(width: int) -> int:
    """The k one 16-bit unit of a plane of `width`-bit fields covers: 16 / width values of
    one parity of k."""
    return 2 * (16 // width)


def narrow_fits(bits: int, k: int) -> bool:
    """Whether K values of `bits` bits fill whole units of each of their planes (8 k for 4
    bits, 32 for 5, 16 for 6)."""
    return bits == 8 or all(k % _field_span(width) == 0 for _, width in _fields(bits))


def _packed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [blocks][K][16] (k-major channel blocks) -> their bytes in `bits` bits,
    [blocks][K * bits / 8 * 16] (PackedGroupedWeight's layout)."""
    blocks, k, _ = values.shape
    if bits == 8:
        return values.reshape(blocks, -1)
    # 6-bit values stored as v + SIX_BIT_BIAS: every stored value unsigned.
    v = (values + SIX_BIT_BIAS).view(torch.uint8) if bits == 6 else values.view(torch.uint8)
    planes = []
    for first, width in _fields(bits):
        per = 16 // width
        field = ((v >> first) & ((1 << width) - 1)).to(torch.int32)
        # [blocks][units][value j][parity p][channel c] -> [blocks][units][c][p][j]
        field = field.view(blocks, k // (2 * per), per, 2, INT8_GROUP).permute(0, 1, 4, 3, 2)
        units = sum(field[..., j] << (width * j) for j in range(per))
        planes.append(torch.stack([units & 255, units >> 8], dim=-1).reshape(blocks, -1))
    return torch.cat(planes, dim=1).to(torch.uint8).view(torch.int8)


def _unpacked(lanes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """One channel's packed values per row (PackedGroupedWeight._lanes): [..., K] bytes, or
    [..., units, 2] 16-bit units of each plane in turn -> its int8 values [..., K]."""
    if bits == 8:
        return lanes
    units = lanes.to(torch.int32) & 0xFFFF
    values, start = 0, 0
    for first, width in _fields(bits):
        per = 16 // width
        count = k // (2 * per)
        plane = units[..., start:start + count, :]  # [..., units, p]
        fields = torch.stack([(plane >> (width * j)) & ((1 << width) - 1)
                              for j in range(per)], dim=-2)  # [..., units, j, p]
        values = values | (fields.flatten(-3) << first)
        start += count
    values = values.to(torch.int8)
    return values - SIX_BIT_BIAS if bits == 6 else values


def _blocked(rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """[N, C] -> [blocks, C * 16]: each block of 16 rows column-major, zero-padded."""
    padded = rows.new_zeros(blocks * INT8_GROUP, rows.shape[1])
    padded[:rows.shape[0]] = rows
    return padded.view(blocks, INT8_GROUP, -1).permute(0, 2, 1).reshape(blocks, -1).contiguous()


def _unblocked(blocked: torch.Tensor, n: int) -> torch.Tensor:
    blocks = blocked.shape[0]
    return blocked.view(blocks, -1, INT8_GROUP).permute(0, 2, 1).reshape(
        blocks * INT8_GROUP, -1)[:n].contiguous()


def pack_grouped_cpu(weight: GroupedWeight,
                     bits: int | None = None) -> PackedGroupedWeight | GroupedWeight:
    """`weight` in the C kernel's grouped layout (see PackedGroupedWeight), its values in the
    fewest bits they fit (`value_bits`; a byte each where K does not fill their planes' units,
    `narrow_fits`), or a byte each (`bits` 8: the layout before 5- and 6-bit packing, which
    benchmarks/bench_grouped_bits_cpu.py times against); as it is where the kernel cannot take
    it (groups not a multiple of 8)."""
    n, k = weight.qweight.shape
    if weight.group_size % 8:
        return weight
    blocks = -(-n // INT8_GROUP)
    fewest = value_bits(weight.qweight)
    fewest = fewest if narrow_fits(fewest, k) else 8
    if bits not in (None, fewest, 8):
        raise ValueError(f"values of {fewest} bits are packed in {fewest} or 8, not {bits}")
    bits = bits or fewest
    data = _packed(_blocked(weight.qweight, blocks).view(blocks, k, INT8_GROUP), bits)
    factors = [t for t in (weight.scales, weight.offsets) if t is not None]
    dtype = torch.float16 if all(torch.equal(t.half().float(), t) for t in factors) \
        else torch.float32
    scales, offsets = (None if t is None else _blocked(t.to(dtype), blocks)
                       for t in (weight.scales, weight.offsets))
    return PackedGroupedWeight(data, bits, scales, offsets, n, k, weight.int16_activations)


def pack_quantized_cpu(weight: QuantizedWeight) -> object:
    """A quantized weight in the C kernels' layout for its kind (an fp8 one as it is: no C
    kernel multiplies fp8)."""
    if isinstance(weight, GroupedWeight):
        return pack_grouped_cpu(weight)
    if isinstance(weight, Int8Weight):
        return pack_int8_cpu(weight)
    return weight


def quantized_linear_cpu(x: torch.Tensor, weight: object,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) by the C kernel for `weight`'s kind (the PyTorch path for a weight the
    kernels could not pack)."""
    if isinstance(weight, PackedGroupedWeight):
        return grouped_linear_cpu(x, weight, bias)
    if isinstance(weight, (PackedInt8Weight, GroupedInt8Weight, Int8Weight)):
        return int8_linear_cpu(x, weight, bias)
    return quantized_linear(x, weight, bias)


def _grouped_int8_linear(x: torch.Tensor, weight: GroupedInt8Weight,
                         bias: torch.Tensor | None) -> torch.Tensor:
    if not weight.dynamic_activations:
        return grouped_linear_cpu(x, weight.grouped, bias)
    # W8A8: x's rows quantized per token and multiplied back by their scales, in float32.
    rows = _rows(x)
    quantized = torch.empty(rows.shape, dtype=torch.float32)
    _library().w8a8_activations(quantized.data_ptr(), rows.data_ptr(), rows.shape[0],
                                rows.shape[1], rows.stride(0), DTYPES[x.dtype],
                                weight.activation_levels)
    y = grouped_linear_cpu(quantized, weight.grouped, None if bias is None
                           else bias.to(torch.float32))
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def grouped_linear_cpu(x: torch.Tensor, weight: PackedGroupedWeight,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """As `quantization.grouped_linear`, by the C kernel (float32 or bfloat16 x)."""
    return _weight_only_linear(
        "grouped_linear", x, bias, weight.out_features, weight.in_features,
        (weight.data.data_ptr(), weight.bits, weight.scales.data_ptr(),
         0 if weight.offsets is None else weight.offsets.data_ptr(),
         weight.scales.dtype == torch.float16, weight.group_size), (weight.int16_activations,))


def int8_linear_cpu(x: torch.Tensor, weight: PackedInt8Weight | GroupedInt8Weight | Int8Weight,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """As `quantization.int8_linear`, by the C kernel (int8_linear.c): W8A8 for float32 or
    bfloat16 x; W8A16 for bfloat16 x (float32 x runs the PyTorch path: the kernel sums
    bfloat16 products). A GroupedInt8Weight: by the grouped kernel, float32 or bfloat16 x."""
    if isinstance(weight, GroupedInt8Weight):
        return _grouped_int8_linear(x, weight, bias)
    if not isinstance(weight, PackedInt8Weight) or (
            not weight.dynamic_activations and x.dtype != torch.bfloat16):
        return int8_linear(x, weight.plain(), bias)
    assert x.dtype in DTYPES and x.shape[-1] == weight.in_features
    assert bias is None or (bias.dtype == x.dtype and bias.is_contiguous())
    rows = _rows(x)
    if not weight.dynamic_activations and weight.in_features % 4:
        rows = torch.nn.functional.pad(rows, (0, 4 - weight.in_features % 4))
    out = torch.empty((*x.shape[:-1], weight.out_features), dtype=x.dtype)
    bias_ptr = 0 if bias is None else bias.data_ptr()
    common = (weight.data.data_ptr(), weight.scales.data_ptr())
    if weight.dynamic_activations:
        failed = _library().int8_linear_w8a8(
            out.data_ptr(), rows.data_ptr(), *common, bias_ptr,
            rows.shape[0], weight.out_features, weight.in_features, rows.stride(0),
            DTYPES[x.dtype], weight.activation_levels)
    else:
        failed = _library().int8_linear_w8a16(
            out.data_ptr(), rows.data_ptr(), *common, bias_ptr, rows.shape[0],
            weight.out_features, rows.shape[1], rows.stride(0))
    if failed:
        raise MemoryError("CPU int8 linear: out of memory for its scratch buffers")
    return out
