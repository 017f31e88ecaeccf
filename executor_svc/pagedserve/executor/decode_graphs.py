"""Decode steps replayed from graphs: CUDA graphs on a GPU, recorded kernel calls on the CPU
(docs/design.md §5).

A decode step of a small or mid-sized model is bound by the Python that drives its kernels, not
by the kernels: on a GPU every layer is a dozen launches of a few microseconds each; on the CPU
the default model's step at batch 1 spends ~4 of ~8 ms in Python between its C kernels. A step
in which every request decodes one token runs the same kernels every time for a given number of
requests, so the executor captures the model's forward pass once per batch size (at start-up
on a GPU, on first use on the CPU), and a decode-only step replays the graph of the smallest
size that holds it
(`DecodeGraphs.run`). The graphs read their inputs from static buffers, which a step fills
with its batch and pads up to the graph's size. A padding row's slot is -1, which every kernel
set's KV write skips (attention.write_kv_cache), so it writes nothing. Its token, position,
block table and context length are whatever the buffers hold: zeros and a context of one
position at first, later a row of an earlier batch. Either way its reads stay inside the pool,
and its output is discarded (no layer mixes rows).

What is captured is the model's forward pass up to the final hidden states. The logits of the
rows that sample, sampling itself, and every step with a prompt chunk or with proposals to
verify run eagerly. The decode kernels are told `max_model_len` as the longest context
(`AttentionMetadata.seq_lens_host`): a graph fixes each kernel's grid (split-K partitions
included) at capture, and each program reads its sequence's real length on the device.

Per device:
- CUDA, with the Triton kernels: real CUDA graphs (`cuda_capture`) of the sizes
  `capture_sizes` lists (1, 2, 4, then multiples of 8: a padding row is nearly free on a GPU).
- CPU, with the C kernels: each forward pass recorded as its list of kernel calls
  (kernels/pagedserve/kernels/cpu_graph.py, `CpuCapture`), every size from 1 to
  MAX_CPU_CAPTURE_SIZE (`cpu_capture_sizes`): on the CPU a padding row costs what a real one
  does, and the sizes share their memory, so no step pads. Capturing a size is running its
  pass once, recorded, so each is captured on the first step that needs it (`lazy`): no
  start-up time for 64 sizes (~6 s for the default model), nothing for sizes no step uses. A
  recorded pass that read a tensor where no operator shows it would replay a stale decision,
  so at start-up the smallest and largest graphs are captured and replayed on probe batches
  and compared with the model run eagerly (`check_replays`).

When (`eager_reason`): on those two, unless --enforce-eager. Also only with one rank for now:
with tensor parallelism the all-reduces would be captured too, and that is unmeasured. A capture
that fails is logged with its error, and the executor runs eagerly (a CPU size captured on
first use that fails runs eagerly from then on).

Memory: the graphs share one memory pool (CUDA) or arena (CPU), whose memory each reuses (on a
GPU captured from the largest size down; on the CPU the start-up check captures the largest).
It holds the activations of the largest size (one token per sequence: far less than the
profiling pass's full token budget). On a GPU it comes on top of the KV cache and is taken
from the headroom that --gpu-memory-utilization leaves; on the CPU it comes on top of
--kv-cache-gib and is logged at start-up.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import time
from collections.abc import Callable

import structlog
import torch
from torch import nn

from pagedserve.executor.batch import FlatBatch, ScheduledSequence, build_flat_batch
from pagedserve.kernels import cpu_graph
from pagedserve.kernels.attention import AttentionMetadata

log = structlog.get_logger(__name__)

# The largest batch captured on a GPU (vLLM's default too): a larger decode step runs eagerly,
# where launch overhead is a small share of its time.
MAX_CAPTURE_SIZE = 512
# The largest on the CPU. A replay saves the default model's step 5-9 ms of Python whatever
# the batch (docs/performance.md, "Decode steps replayed on the CPU"): 0.6x the step at batch 1,
# 0.9x at 64, less beyond, while the arena grows with the size (48 MiB at 64 for that model).
MAX_CPU_CAPTURE_SIZE = 64
# The probe batch's contexts (check_replays): long enough to span several blocks.
PROBE_CONTEXT = 64

# capture(forward) records `forward`, running it (a CUDA capture runs it once before, to
# compile and allocate what it needs once); returns (replay, output): replay() reruns the
# recorded work on whatever the static inputs hold, writing into `output`, the tensor the
# recorded run returned.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8, up to the first that holds
    max_num_seqs (or MAX_CAPTURE_SIZE). Steps of other sizes pad to the next one up: at most
    7 padding rows, at most 1/8 more work for any size from 8 up."""
    limit = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = []
    for size in itertools.chain((1, 2, 4), itertools.count(8, 8)):
        sizes.append(size)
        if size >= limit:
            return sizes


def cpu_capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture on the CPU: every one up to max_num_seqs (or
    MAX_CPU_CAPTURE_SIZE), since a padding row costs what a real one does there."""
    return list(range(1, min(max_num_seqs, MAX_CPU_CAPTURE_SIZE) + 1))


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds num_seqs; None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def eager_reason(device: torch.device, kernels: str, tensor_parallel_size: int,
                 enforce_eager: bool) -> str | None:
    """Why decode steps cannot replay graphs here (None: they can)."""
    if enforce_eager:
        return "--enforce-eager"
    replayed = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
    if replayed is None:
        return f"no decode graphs on {device.type}"
    if kernels != replayed:
        return f"decode graphs on {device.type} replay the {replayed} kernels, not {kernels}"
    if tensor_parallel_size > 1:
        return "decode graphs are not captured with tensor parallelism yet"
    return None


def cuda_capture(device: torch.device) -> Capture:
    """Capture into real CUDA graphs, all sharing one memory pool."""
    pool = torch.cuda.graph_pool_handle()

    def capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        forward()  # outside the graph: Triton compiles, cuBLAS makes its workspace
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = forward()
        return graph.replay, output
    return capture


class CpuCapture:
    """Record into CPU graphs (cpu_graph.py), all sharing one arena."""

    def __init__(self):
        self.arena = cpu_graph.Arena()

    def __call__(self, forward: Callable[[], torch.Tensor]
                 ) -> tuple[Callable[[], None], torch.Tensor]:
        graph, output = cpu_graph.capture(forward, self.arena)
        return graph.replay, output


class DecodeGraphs:
    """A model's forward pass captured for decode-only batches of each of `sizes` (ascending),
    over static input buffers; `run` replays the one that fits a batch. All are captured now,
    largest first, or with `lazy` each on the first step that needs it, whose output the
    capture computes (a CPU capture runs the pass; a CUDA capture does not, so it is never
    lazy)."""

    def __init__(self, model: nn.Module, sizes: list[int], max_model_len: int, block_size: int,
                 device: torch.device, capture: Capture, lazy: bool = False):
        self.model, self.capture = model, capture
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.block_size = block_size
        rows = sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(rows, -(-max_model_len // block_size), dtype=torch.long,
                                        device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        # size -> (replay, output); None for a size whose capture failed (it runs eagerly)
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor] | None] = {}
        self.capture_seconds = 0.0
        if not lazy:
            for size in reversed(sizes):  # largest first: the smaller reuse its memory
                self._capture(size)

    def _capture(self, size: int) -> None:
        started = time.perf_counter()
        with torch.inference_mode():
            self.graphs[size] = self.capture(functools.partial(self._forward, self.model, size))
        self.capture_seconds += time.perf_counter() - started

    def _forward(self, model: nn.Module, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], query_start_loc=self.query_start_loc[:size + 1],
            query_lens=[1] * size, seq_lens_host=[self.max_model_len] * size,
            num_decodes=size)
        return model(self.input_ids[:size], self.positions[:size], meta)

    def run(self, batch: FlatBatch) -> torch.Tensor | None:
        """The final hidden states of `batch` ([num_seqs, hidden]) from a graph's replay, valid
        until the next replay; None when no graph fits it (a prompt chunk or proposals in it,
        more sequences than the largest size, or a block table wider than max_model_len's)."""
        meta = batch.meta
        num_seqs, width = meta.block_tables.shape
        size = padded_size(num_seqs, self.sizes)
        if meta.num_decodes < num_seqs or size is None or width > self.block_tables.shape[1]:
            return None
        self.input_ids[:num_seqs].copy_(batch.input_ids)
        self.positions[:num_seqs].copy_(batch.positions)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens)
        # Rows a larger batch left behind are padding now: their slots must not be written.
        self.slot_mapping[num_seqs:size] = -1
        if size not in self.graphs:  # lazy: a CPU capture runs the pass, so this is the step
            try:
                self._capture(size)
            except cpu_graph.CaptureError as exc:
                # The eager pass writes again the K/V the capture may have written.
                log.warning("decode graph capture failed: steps of this size run eagerly",
                            batch_size=size, error=str(exc))
                self.graphs[size] = None
                return None
            return self.graphs[size][1][:num_seqs]
        graph = self.graphs[size]
        if graph is None:
            return None
        replay, output = graph
        replay()
        return output[:num_seqs]


def check_replays(graphs: DecodeGraphs, model: nn.Module) -> None:
    """Replay the smallest and the largest graph on two probe batches each (random tokens and
    contexts; their slots are -1, so the cache is left as it is; a lazy graph is captured on
    the first) and compare with the model run eagerly on them; raises RuntimeError where they
    differ, or where a capture failed."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size
    sizes = sorted({graphs.sizes[0], graphs.sizes[-1]})
    for size in [size for size in sizes for _ in range(2)]:  # the second probe replays
        contexts = torch.randint(min(graphs.max_model_len, PROBE_CONTEXT), (size,),
                                 generator=generator).tolist()
        tokens = torch.randint(vocab_size, (size,), generator=generator).tolist()
        batch = build_flat_batch(
            [ScheduledSequence([token], context, [0] * (context // graphs.block_size + 1))
             for token, context in zip(tokens, contexts, strict=True)], graphs.block_size)
        batch.meta.slot_mapping.fill_(-1)
        with torch.inference_mode():
            replayed = graphs.run(batch)
            if replayed is None:
                raise RuntimeError(f"the {size}-sequence graph could not be captured")
            replayed = replayed.clone()
            eager = model(batch.input_ids, batch.positions, batch.meta)
        if not torch.allclose(replayed.float(), eager.float(), rtol=1e-3, atol=1e-3):
            difference = (replayed.float() - eager.float()).abs().max().item()
            raise RuntimeError(f"the {size}-sequence graph's replay differs from the eager "
                               f"forward pass (by up to {difference:.3g})")


def capture_decode_graphs(model: nn.Module, max_num_seqs: int, max_model_len: int,
                          block_size: int, device: torch.device) -> DecodeGraphs | None:
    """The model's decode graphs on this device (CUDA or CPU), their capture timed and logged;
    None (logged, the executor runs eagerly) when a capture fails."""
    if device.type == "cuda":
        sizes, capture = capture_sizes(max_num_seqs), cuda_capture(device)
    else:
        sizes, capture = cpu_capture_sizes(max_num_seqs), CpuCapture()
    try:
        # On the CPU, capturing is running the pass once: each size on its first step.
        graphs = DecodeGraphs(model, sizes, max_model_len, block_size, device, capture,
                              lazy=isinstance(capture, CpuCapture))
        if isinstance(capture, CpuCapture):
            check_replays(graphs, model)
    except RuntimeError as exc:
        log.warning("decode graph capture failed: decode steps run eagerly "
                    "(--enforce-eager skips the capture)", device=device.type, error=str(exc))
        return None
    memory = {"memory_mib": round(capture.arena.nbytes / 2**20, 1)} \
        if isinstance(capture, CpuCapture) else {}
    captured = sum(graph is not None for graph in graphs.graphs.values())
    log.info("decode graphs ready", device=device.type, batch_sizes=len(sizes),
             largest=sizes[-1], captured=captured, seconds=round(graphs.capture_seconds, 2),
             **memory)
    return graphs
