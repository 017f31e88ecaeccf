"""A forward pass on the CPU recorded once as the list of its kernel calls and replayed without
Python: the CPU's counterpart of a CUDA graph.

Why: a decode step of a small model on the CPU spends more time in Python than in its kernels.
The default model's step at batch 1 is ~330 C kernel calls (cpu_kernels.py) and ~8 ms, of which
the kernels take ~3.5; the rest is the modules' Python, the wrappers' checks and PyTorch's
tensor bookkeeping, the same work every step (docs/performance.md, "Decode steps replayed on the
CPU"). A replay calls the same kernels with the same arguments, which now point at whatever the
static input buffers hold.

`capture(forward, arena)` runs `forward` once and records, in order:
- every C kernel call (`cpu_kernels.recording`): the ctypes function and its arguments (data
  pointers, sizes, ctypes structs). Replayed as is; a nonzero status fails the replay, as the
  wrapper that made the call would have.
- every PyTorch operator that computes something (a `TorchDispatchMode` sees each): replayed by
  calling it again on the same tensors and copying its result into the tensor the recorded run
  returned, or, for an in-place operator, by calling it again. The default model's quantized
  embedding is a few of these; a family whose layers use PyTorch operators replays them too.
- views, aliases and allocations are not replayed: their memory is what the recorded calls
  point at.

What cannot be replayed fails the capture (`CaptureError`, naming the operator), so the caller
runs eagerly: an operator whose result reaches Python (`.item()`, `torch.equal`: Python would
decide on a value the replay cannot change) or whose output's shape depends on the values
(`nonzero`, boolean masks; the MoE families' routing). What no operator shows (`.tolist()`,
NumPy) cannot be seen here: the executor replays its graphs on probe batches against the eager
pass before using them (decode_graphs.check_replays), and the tests replay each model family.

Memory: every tensor the recorded run allocated is kept, since the recorded calls point into it
(within a pass, no two intermediates share memory). `torch.empty` and `empty_like` (where the
kernel wrappers allocate their outputs) are served from an `Arena` that every capture sharing it
starts at its beginning: graphs that never run at the same time (one per batch size) use the same
memory, as CUDA graphs share a pool. A replay's output is therefore valid until the next replay
or capture of any graph of the arena.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pagedserve.kernels import cpu_kernels

aten = torch.ops.aten

# Operators whose only effect is memory for their output: served from the arena, never replayed.
ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
               aten.new_empty.default, aten.new_empty_strided.default}
ALIGNMENT = 64  # bytes: a cache line, as PyTorch's CPU allocator aligns
CHUNK_BYTES = 16 << 20


class CaptureError(RuntimeError):
    """The forward pass did something a replay could not repeat."""


class Arena:
    """Memory for the tensors that recorded forward passes allocate: chunks that grow as a
    capture needs them and are handed out in order from the first again by each capture
    (`rewind`)."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.chunk = self.offset = 0

    @property
    def nbytes(self) -> int:
        return sum(chunk.numel() for chunk in self.chunks)

    def rewind(self) -> None:
        self.chunk = self.offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes (uint8), 64-byte aligned, after what this capture took before."""
        nbytes = max(-(-nbytes // ALIGNMENT) * ALIGNMENT, ALIGNMENT)
        while self.chunk < len(self.chunks) and \
                self.offset + nbytes > self.chunks[self.chunk].numel():
            self.chunk, self.offset = self.chunk + 1, 0
        if self.chunk == len(self.chunks):
            # Over-allocated by one alignment so that the chunk's start can be aligned.
            raw = torch.empty(max(nbytes, CHUNK_BYTES) + ALIGNMENT, dtype=torch.uint8)
            self.chunks.append(raw[-raw.data_ptr() % ALIGNMENT:][:max(nbytes, CHUNK_BYTES)])
        memory = self.chunks[self.chunk][self.offset:self.offset + nbytes]
        self.offset += nbytes
        return memory


def _tensors(value) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def _depends_on_values(op, args: tuple) -> bool:
    """Whether the operator's output shape, or its result, depends on tensor values. Indexing
    is tagged so for boolean masks; with integer indices (an embedding's gather) its shape is
    the indices'."""
    if op is aten.index.Tensor:
        return any(index is not None and index.dtype == torch.bool for index in args[1])
    return torch.Tag.dynamic_output_shape in op.tags or \
        torch.Tag.data_dependent_output in op.tags


def _rerun(op, args: tuple, kwargs: dict, outputs: list[torch.Tensor]) -> Callable[[], None]:
    """The replay of a recorded operator that returned new tensors `outputs`."""
    def rerun() -> None:
        for recorded, fresh in zip(outputs, _tensors(op(*args, **kwargs)), strict=True):
            if fresh.shape != recorded.shape:  # copy_ would broadcast it silently
                raise RuntimeError(f"{op} returned {tuple(fresh.shape)} in a graph replay, "
                                   f"{tuple(recorded.shape)} when recorded")
            recorded.copy_(fresh)
    return rerun


def _rerun_in_place(op, args: tuple, kwargs: dict) -> Callable[[], None]:
    """The replay of a recorded operator that wrote into its arguments."""
    def rerun() -> None:
        op(*args, **kwargs)
    return rerun


class _Recorder(TorchDispatchMode):
    """Records the PyTorch operators of a forward pass into `calls` (beside its kernel calls),
    serves its allocations from `arena` and keeps every tensor it made."""

    def __init__(self, calls: list[cpu_kernels.KernelCall], arena: Arena):
        super().__init__()
        self.calls, self.arena = calls, arena
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _depends_on_values(op, args):
            raise CaptureError(f"{op} cannot be replayed: its result depends on tensor values "
                               "(its shape, or a value read on the host)")
        result = op(*args, **kwargs)
        outputs = _tensors(result)
        if not outputs:
            raise CaptureError(f"{op} cannot be replayed: it returns {type(result).__name__}, "
                               "not tensors")
        if op in ALLOCATIONS:
            template, = outputs
            memory = self.arena.take(template.untyped_storage().nbytes())
            result = memory.view(template.dtype).as_strided(template.shape, template.stride())
            outputs = [result]
        elif op._schema.is_mutable:
            self.calls.append((_rerun_in_place(op, args, kwargs), ()))
        elif not self._aliases_an_input(outputs, args, kwargs):  # a view is not replayed
            self.calls.append((_rerun(op, args, kwargs, outputs), ()))
        self.kept.extend(outputs)
        return result

    @staticmethod
    def _aliases_an_input(outputs: list[torch.Tensor], args: tuple, kwargs: dict) -> bool:
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        return any(t.untyped_storage().data_ptr() in inputs for t in outputs)


class CpuGraph:
    """A recorded forward pass: `replay` reruns its kernel calls and operators in order."""

    def __init__(self, calls: list[cpu_kernels.KernelCall], kept: list[torch.Tensor]):
        self.calls = calls
        self.kept = kept  # the memory the calls point at

    @torch.inference_mode()  # the recorded tensors are inference tensors: captured in it
    def replay(self) -> None:
        for call, args in self.calls:
            if call(*args):  # as the kernel's wrapper reads its status
                raise MemoryError(f"CPU kernel {call.__name__} (in a graph replay): out of "
                                  "memory for its scratch buffers")


def capture(forward: Callable[[], torch.Tensor], arena: Arena) -> tuple[CpuGraph, torch.Tensor]:
    """Run `forward` once, recorded (module docstring); returns the graph and the tensor the
    run returned, which each replay rewrites. Raises CaptureError where a replay could not
    repeat the run."""
    calls: list[cpu_kernels.KernelCall] = []
    arena.rewind()
    recorder = _Recorder(calls, arena)
    with cpu_kernels.recording(calls), recorder:
        output = forward()
    return CpuGraph(calls, recorder.kept), output
