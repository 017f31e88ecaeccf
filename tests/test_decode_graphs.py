"""Decode graphs (executor_svc/pagedserve/executor/decode_graphs.py) on the CPU: which batch sizes
are captured, when graphs apply, and the static buffers' padding, checked against the same model
run eagerly, with real CPU graphs (kernels/pagedserve/kernels/cpu_graph.py) and with a stand-in
for a CUDA capture (pagedserve.testing.graphs); a capture whose replays would differ from the
eager pass is refused. The runner's tests (tests/test_runner.py, the "graphs" and "cpu-graphs"
runners) run every scenario through this path against transformers, and
tests/test_model_families.py each family's CPU graphs."""

import pytest
import structlog
import torch

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
from pagedserve.executor.decode_graphs import (
    MAX_CAPTURE_SIZE,
    MAX_CPU_CAPTURE_SIZE,
    CpuCapture,
    DecodeGraphs,
    capture_decode_graphs,
    capture_sizes,
    check_replays,
    cpu_capture_sizes,
    eager_reason,
    padded_size,
)
from pagedserve.executor.kv_cache import allocate_kv_cache
from pagedserve.executor.models import load_model
from pagedserve.executor.models.layers import bind_kernels, quantize_linears
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.dispatch import TORCH_KERNELS
from pagedserve.kernels.dispatch import cpu_kernels as cpu_kernel_set
from pagedserve.testing.graphs import EagerCapture

BLOCK = 4
NUM_BLOCKS = 32
MAX_MODEL_LEN = 64


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]  # the first size that holds 20
    sizes = capture_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 3 + 32
    assert capture_sizes(10_000)[-1] == MAX_CAPTURE_SIZE


def test_cpu_capture_sizes_are_every_size():
    assert cpu_capture_sizes(3) == [1, 2, 3]
    assert cpu_capture_sizes(256) == list(range(1, MAX_CPU_CAPTURE_SIZE + 1))


def test_padded_size():
    sizes = capture_sizes(24)
    assert [padded_size(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 17, 24)] == \
        [1, 2, 4, 4, 8, 8, 16, 24, 24]
    assert padded_size(25, sizes) is None


def test_graphs_on_cuda_with_triton_and_on_cpu_with_the_c_kernels_with_one_rank():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert eager_reason(cuda, "triton", 1, enforce_eager=False) is None
    assert eager_reason(cpu, "cpu", 1, enforce_eager=False) is None
    assert "--enforce-eager" in eager_reason(cuda, "triton", 1, enforce_eager=True)
    assert "--enforce-eager" in eager_reason(cpu, "cpu", 1, enforce_eager=True)
    assert "not triton" in eager_reason(cpu, "triton", 1, enforce_eager=False)
    assert "not torch" in eager_reason(cpu, "torch", 1, enforce_eager=False)
    assert "not torch" in eager_reason(cuda, "torch", 1, enforce_eager=False)
    assert "mps" in eager_reason(torch.device("mps"), "torch", 1, enforce_eager=False)
    assert "tensor parallelism" in eager_reason(cuda, "triton", 2, enforce_eager=False)
    assert "tensor parallelism" in eager_reason(cpu, "cpu", 2, enforce_eager=False)


needs_c_kernels = pytest.mark.skipif(not cpu_kernels.available(),
                                     reason="no C compiler: the CPU kernels are not built")


def kernel_sets():
    """Each kernel set with the stand-in capture (replays counted), and the C kernels with
    real CPU graphs."""
    sets = [pytest.param(TORCH_KERNELS, EagerCapture, id="torch")]
    if cpu_kernels.available():
        sets += [pytest.param(cpu_kernel_set(), EagerCapture, id="cpu"),
                 pytest.param(cpu_kernel_set(), CpuCapture, id="cpu-recorded")]
    try:
        from pagedserve.kernels.dispatch import triton_kernels
        sets.append(pytest.param(triton_kernels(), EagerCapture, id="triton"))
    except ImportError:
        pass
    return sets


class Twins:
    """The model twice, same weights, own caches: one replays decode graphs, one runs eagerly;
    each sequence holds the same blocks in both."""

    def __init__(self, directory, kernels, capture=EagerCapture, quantization=None):
        self.models = [load_model(directory, torch.float32) for _ in range(2)]
        for model in self.models:
            if quantization:  # the same weights: quantization is deterministic
                quantize_linears(model, quantization)
            bind_kernels(model, kernels)
            allocate_kv_cache(model, NUM_BLOCKS, BLOCK, torch.float32, torch.device("cpu"))
        self.capture = capture()
        self.graphs = DecodeGraphs(self.models[0], capture_sizes(8), MAX_MODEL_LEN, BLOCK,
                                   torch.device("cpu"), self.capture)

    def caches(self, model):
        return [t for m in model.modules() if getattr(m, "kv_cache", None) is not None
                for t in m.kv_cache]

    def run(self, seqs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(graphs' hidden states or None, the eager twin's)."""
        batch = build_flat_batch(seqs, BLOCK)
        with torch.inference_mode():
            replayed = self.graphs.run(batch)
            replayed = None if replayed is None else replayed.clone()
            eager = self.models[1](batch.input_ids, batch.positions, batch.meta)
            if replayed is None:  # both twins' caches take the step
                self.models[0](batch.input_ids, batch.positions, batch.meta)
        return replayed, eager

    def assert_same_caches(self):
        """Equal but for rounding (a padded batch's matmuls may round differently): a slot
        written by a padding row, or not written, differs by far more."""
        for ours, theirs in zip(*(self.caches(m) for m in self.models), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels, capture", kernel_sets())
def test_padded_replays_match_eager_and_write_only_their_slots(tiny_llama_dir, kernels,
                                                               capture):
    twins = Twins(tiny_llama_dir, kernels, capture)
    counted = isinstance(twins.capture, EagerCapture)
    # Block 0 belongs to a sequence: a padding row that wrote slot 0 would show.
    tables = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    prompts = [list(range(10, 19)), list(range(20, 25)), list(range(30, 43)), [7, 8, 9],
               list(range(50, 60))]
    replayed, _ = twins.run([ScheduledSequence(p, 0, t) for p, t in zip(prompts, tables,
                                                                          strict=True)])
    assert replayed is None  # prompts run eagerly
    lengths = [len(p) for p in prompts]

    def decode(which: list[int]):
        seqs = [ScheduledSequence([100 + i], lengths[i], tables[i]) for i in which]
        replayed, eager = twins.run(seqs)
        assert replayed is not None
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        for i in which:
            lengths[i] += 1
        twins.assert_same_caches()

    decode([0, 1, 2, 3, 4])  # 5 rows: graph 8, 3 padding rows
    assert not counted or twins.capture.replays == {1: 0, 2: 0, 4: 0, 8: 1}
    # Sequence 3 ends; its blocks go to another request, which writes its K/V where sequence
    # 3's last token was (in both twins). The next batch is 3 sequences, padded to 4: the row
    # sequence 3 held is padding now and must not write that slot again.
    last = lengths[3] - 1
    slot = tables[3][last // BLOCK] * BLOCK + last % BLOCK
    for model in twins.models:
        for cache in twins.caches(model):
            cache.view(-1, *cache.shape[2:])[slot] = 0.5
    decode([0, 2, 4])
    decode([1, 2, 4])
    decode([4])
    assert not counted or twins.capture.replays == {1: 1, 2: 0, 4: 2, 8: 1}


@pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler")
@pytest.mark.parametrize("quantization", ["int8", "w8a8_int8"])
def test_quantized_linears_replay_as_they_run_eagerly(tiny_llama_dir, quantization):
    """Int8 weights through the C kernels' recorded calls (on CPUs without AVX-512 VNNI, the
    grouped kernel, W8A8's activations quantized by their own call) at 1 to 5 rows."""
    twins = Twins(tiny_llama_dir, cpu_kernel_set(), CpuCapture, quantization)
    tables = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    lengths = [3, 6, 2, 5, 4]
    replayed, _ = twins.run([ScheduledSequence(list(range(10, 10 + n)), 0, t)
                             for n, t in zip(lengths, tables, strict=True)])
    assert replayed is None
    for which in ([0, 1, 2, 3, 4], [0, 2], [4], [1, 3, 4]):
        replayed, eager = twins.run([ScheduledSequence([60 + i], lengths[i], tables[i])
                                     for i in which])
        assert replayed is not None
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        for i in which:
            lengths[i] += 1
        twins.assert_same_caches()


def test_batches_no_graph_fits_run_eagerly(tiny_llama_dir):
    twins = Twins(tiny_llama_dir, TORCH_KERNELS)
    tables = [[i] for i in range(9)]
    assert twins.run([ScheduledSequence([5], 0, t) for t in tables])[0] is None  # 9 > 8
    mixed = [ScheduledSequence([5], 1, [0]), ScheduledSequence([5, 6], 1, [1])]
    assert twins.run(mixed)[0] is None  # a prompt chunk (or proposals): eager
    wide = [ScheduledSequence([5], 1, list(range(MAX_MODEL_LEN // BLOCK + 1)))]
    assert twins.run(wide)[0] is None  # a table wider than max_model_len's
    assert sum(twins.capture.replays.values()) == 0
    twins.assert_same_caches()


class ReadsATokenOnTheHost(torch.nn.Module):
    """The model, plus its first token's id read with tolist(), which no operator shows: a
    recorded pass would replay the id it read at capture."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, meta) + input_ids.tolist()[0]


@needs_c_kernels
def test_replays_are_checked_against_the_eager_pass(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    bind_kernels(model, cpu_kernel_set())
    allocate_kv_cache(model, NUM_BLOCKS, BLOCK, torch.float32, torch.device("cpu"))
    graphs = DecodeGraphs(model, cpu_capture_sizes(4), MAX_MODEL_LEN, BLOCK,
                          torch.device("cpu"), CpuCapture())
    check_replays(graphs, model)
    stale = ReadsATokenOnTheHost(model)
    graphs = DecodeGraphs(stale, cpu_capture_sizes(4), MAX_MODEL_LEN, BLOCK,
                          torch.device("cpu"), CpuCapture())
    with pytest.raises(RuntimeError, match="replay differs from the eager"):
        check_replays(graphs, stale)
    # the probe wrote nothing to the cache
    assert all(not t.any() for m in model.modules()
               if getattr(m, "kv_cache", None) is not None for t in m.kv_cache)


@needs_c_kernels
def test_a_refused_capture_leaves_the_executor_eager(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    bind_kernels(model, cpu_kernel_set())
    allocate_kv_cache(model, NUM_BLOCKS, BLOCK, torch.float32, torch.device("cpu"))
    with structlog.testing.capture_logs() as logs:
        assert capture_decode_graphs(ReadsATokenOnTheHost(model), 4, MAX_MODEL_LEN, BLOCK,
                                     torch.device("cpu")) is None
        graphs = capture_decode_graphs(model, 4, MAX_MODEL_LEN, BLOCK, torch.device("cpu"))
    assert graphs.sizes == [1, 2, 3, 4]
    assert [log["event"] for log in logs if log["log_level"] != "info"] == [
        "decode graph capture failed: decode steps run eagerly (--enforce-eager skips the "
        "capture)"]
    ready, = (log for log in logs if log["event"] == "decode graphs ready")
    assert ready["captured"] == 2 and ready["memory_mib"] > 0


class ReadsAValueAtBatchSize(torch.nn.Module):
    """The model, plus a value read with .item() in batches of `size` sequences."""

    def __init__(self, model, size: int):
        super().__init__()
        self.model, self.config, self.size = model, model.config, size

    def forward(self, input_ids, positions, meta):
        hidden = self.model(input_ids, positions, meta)
        return hidden * float(positions.max()) if len(input_ids) == self.size else hidden


@needs_c_kernels
def test_cpu_sizes_are_captured_on_first_use_and_a_failed_one_runs_eagerly(tiny_llama_dir):
    model = load_model(tiny_llama_dir, torch.float32)
    bind_kernels(model, cpu_kernel_set())
    allocate_kv_cache(model, NUM_BLOCKS, BLOCK, torch.float32, torch.device("cpu"))
    graphs = capture_decode_graphs(ReadsAValueAtBatchSize(model, 3), 4, MAX_MODEL_LEN, BLOCK,
                                   torch.device("cpu"))
    assert sorted(graphs.graphs) == [1, 4]  # the probes' sizes; the others wait for a step
    for first_token in (5, 9):  # captured by the first step of two sequences, then replayed
        batch = build_flat_batch([ScheduledSequence([first_token + i], 1 + i, [i])
                                  for i in range(2)], BLOCK)
        with torch.inference_mode():
            replayed = graphs.run(batch).clone()
            torch.testing.assert_close(replayed,
                                       model(batch.input_ids, batch.positions, batch.meta))
        assert sorted(graphs.graphs) == [1, 2, 4]
    three = build_flat_batch([ScheduledSequence([5], 3, [i]) for i in range(3)], BLOCK)
    with torch.inference_mode(), structlog.testing.capture_logs() as logs:
        assert graphs.run(three) is None  # the runner then runs the step eagerly
    failed, = logs
    assert failed["batch_size"] == 3 and "aten.item" in failed["error"]
    assert graphs.graphs[3] is None
    with torch.inference_mode():
        assert graphs.run(three) is None and graphs.run(batch) is not None
