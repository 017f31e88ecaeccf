"""CPU graphs (kernels/pagedserve/kernels/cpu_graph.py): a forward pass recorded as its C kernel
calls and PyTorch operators, replayed on new inputs and checked against the same work run
eagerly (the PyTorch path as the reference); what a replay could not repeat refused at capture;
the arena's memory shared by captures."""

import threading

import pytest
import torch

from pagedserve.kernels import cpu_graph, cpu_kernels
from pagedserve.kernels.activation import silu_and_mul
from pagedserve.kernels.cpu_graph import Arena, CaptureError, CpuGraph, capture
from pagedserve.kernels.norm import add_rms_norm

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="no C compiler: the CPU kernels are not built")

EPS = 1e-6


class Inputs:
    """Static buffers a graph reads: x [4, 32], residual [4, 32], norm weight [32]."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(4, 32, generator=generator)
        self.residual = torch.randn(4, 32, generator=generator)
        self.weight = torch.rand(32, generator=generator) + 0.5

    def load(self, other: "Inputs") -> None:
        for mine, theirs in ((self.x, other.x), (self.residual, other.residual),
                             (self.weight, other.weight)):
            mine.copy_(theirs)


def c_kernels_and_operators(inputs: Inputs) -> torch.Tensor:
    """C kernels (fused add + RMSNorm, SiLU-and-mul) with PyTorch operators between them: a
    product, a view, an in-place add and an integer-indexed gather."""
    normed, summed = cpu_kernels.add_rms_norm_cpu(inputs.x, inputs.residual, inputs.weight, EPS)
    doubled = torch.cat([normed, summed * 2], dim=-1)  # [4, 64]
    activated = cpu_kernels.silu_and_mul_cpu(doubled)  # [4, 32]
    activated.view(2, 64).add_(1.0)
    return activated[torch.tensor([3, 0])]


def reference(inputs: Inputs) -> torch.Tensor:
    normed, summed = add_rms_norm(inputs.x, inputs.residual, inputs.weight, EPS)
    activated = silu_and_mul(torch.cat([normed, summed * 2], dim=-1)) + 1.0
    return activated[[3, 0]]


def test_a_replay_recomputes_from_what_the_inputs_hold_now():
    inputs, arena = Inputs(0), Arena()
    graph, output = capture(lambda: c_kernels_and_operators(inputs), arena)
    torch.testing.assert_close(output, reference(inputs))
    kernels = [(call, args) for call, args in graph.calls if hasattr(call, "argtypes")]
    assert [call.__name__ for call, _ in kernels] == ["rms_norm", "silu_and_mul"]
    # A replay reads a kernel's result as its status: these have none, and say so.
    assert [call(*args) for call, args in kernels] == [None, None]
    # mul, cat, add_ and the gather; the views and allocations are not replayed
    assert len(graph.calls) == 2 + 4
    for seed in (1, 2):
        fresh = Inputs(seed)
        inputs.load(fresh)
        graph.replay()
        torch.testing.assert_close(output, reference(fresh))


def test_an_in_place_operator_is_applied_once_a_replay():
    counter = torch.zeros(3)
    graph, output = capture(lambda: counter.add_(1.0), Arena())
    assert output is counter
    graph.replay()
    graph.replay()
    assert counter.tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("forward, operator", [
    (lambda x: x * float(x.sum()), "_local_scalar_dense"),  # a value read on the host
    (lambda x: x[x > 0], "index"),  # a boolean mask: the shape follows the values
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: x + torch.equal(x, x), "equal"),
])
def test_what_a_replay_cannot_repeat_fails_the_capture_naming_it(forward, operator):
    x = torch.randn(8)
    with pytest.raises(CaptureError, match=operator):
        capture(lambda: forward(x), Arena())
    # the recording ended with the failed capture
    assert cpu_kernels._recording is None


def test_allocations_come_from_the_arena_and_captures_share_it():
    arena = Arena()
    inputs = Inputs(0)
    _, first = capture(lambda: cpu_kernels.rms_norm_cpu(inputs.x, inputs.weight, EPS), arena)
    start = arena.chunks[0].data_ptr()
    assert first.data_ptr() == start and start % cpu_graph.ALIGNMENT == 0
    _, second = capture(lambda: cpu_kernels.rms_norm_cpu(inputs.x[:2], inputs.weight, EPS),
                        arena)
    assert second.data_ptr() == start  # the same memory, from its beginning again
    assert arena.nbytes == cpu_graph.CHUNK_BYTES


def test_the_arena_aligns_and_grows_by_chunks():
    arena = Arena()
    small = arena.take(10)
    assert small.numel() == 64 and arena.take(1).data_ptr() == small.data_ptr() + 64
    big = arena.take(cpu_graph.CHUNK_BYTES + 1)  # too big for what is left: a chunk its size
    assert len(arena.chunks) == 2 and big.data_ptr() % cpu_graph.ALIGNMENT == 0
    assert big.numel() == cpu_graph.CHUNK_BYTES + 64
    arena.rewind()
    assert arena.take(10).data_ptr() == small.data_ptr()


def test_a_failed_kernel_fails_the_replay():
    def failing_kernel():
        return 1  # a kernel's status: out of memory for its scratch buffers
    with pytest.raises(MemoryError, match="failing_kernel"):
        CpuGraph([(failing_kernel, ())], []).replay()


def test_a_replayed_operator_whose_shape_changed_fails_the_replay():
    size = torch.zeros(2, dtype=torch.long)
    graph, _ = capture(lambda: torch.arange(4).repeat_interleave(2)[size], Arena())
    size.resize_(3).zero_()  # what the recorded gather's shape followed
    with pytest.raises(RuntimeError, match="in a graph replay"):
        graph.replay()


def test_other_threads_kernels_are_not_recorded():
    inputs = Inputs(0)
    other = Inputs(1)
    done = threading.Event()

    def forward():
        thread = threading.Thread(
            target=lambda: (cpu_kernels.rms_norm_cpu(other.x, other.weight, EPS), done.set()))
        thread.start()
        thread.join()
        return cpu_kernels.rms_norm_cpu(inputs.x, inputs.weight, EPS)
    graph, _ = capture(forward, Arena())
    assert done.is_set() and len(graph.calls) == 1


def test_one_recording_at_a_time():
    with cpu_kernels.recording([]):
        with pytest.raises(RuntimeError, match="already"):
            with cpu_kernels.recording([]):
                pass
