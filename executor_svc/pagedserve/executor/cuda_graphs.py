"""Decode steps replayed from CUDA graphs (docs/design.md §5).

On a GPU, a decode step of a small or mid-sized model is bound by launching its kernels from
Python, not by the GPU: every layer is a dozen launches of a few microseconds each. A step in
which every request decodes one token runs the same kernels every time for a given number of
requests, so at start-up the executor captures the model's forward pass once per batch size in
`capture_sizes`, and a decode-only step then replays the graph of the smallest size that holds
it (`DecodeGraphs.run`). The graphs read their inputs from static buffers, which a step fills
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

When (`eager_reason`): on CUDA with the Triton kernels, unless --enforce-eager. Also only with
one rank for now: with tensor parallelism the all-reduces would be captured too, and that is
unmeasured. A capture that fails is logged with its error, and the executor runs eagerly.

Memory: the graphs share one memory pool, captured from the largest size down, so the smaller
ones reuse its blocks. The pool holds the activations of the largest size (one token per
sequence: far less than the profiling pass's full token budget). It comes on top of the KV cache
and is taken from the headroom that --gpu-memory-utilization leaves.
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

from pagedserve.executor.batch import FlatBatch
from pagedserve.kernels.attention import AttentionMetadata

log = structlog.get_logger(__name__)

# The largest batch captured (vLLM's default too): a larger decode step runs eagerly, where
# launch overhead is a small share of its time.
MAX_CAPTURE_SIZE = 512

# capture(forward) runs `forward` once outside the graph (to compile and allocate what it needs
# once), then records it; returns (replay, output): replay() reruns the recorded work on
# whatever the static inputs hold, writing into `output`, the tensor the recorded run returned.
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


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds num_seqs; None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def eager_reason(device: torch.device, kernels: str, tensor_parallel_size: int,
                 enforce_eager: bool) -> str | None:
    """Why decode steps cannot replay graphs here (None: they can)."""
    if enforce_eager:
        return "--enforce-eager"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if kernels != "triton":
        return f"CUDA graphs are captured with the triton kernels, not {kernels}"
    if tensor_parallel_size > 1:
        return "CUDA graphs are not captured with tensor parallelism yet"
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


class DecodeGraphs:
    """A model's forward pass captured for decode-only batches of each of `sizes` (ascending),
    over static input buffers; `run` replays the one that fits a batch."""

    def __init__(self, model: nn.Module, sizes: list[int], max_model_len: int, block_size: int,
                 device: torch.device, capture: Capture):
        self.sizes = sizes
        self.max_model_len = max_model_len
        rows = sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(rows, -(-max_model_len // block_size), dtype=torch.long,
                                        device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.long, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        started = time.perf_counter()
        with torch.inference_mode():
            # Largest first: the smaller graphs reuse the pool's blocks.
            self.graphs = {size: capture(functools.partial(self._forward, model, size))
                           for size in reversed(sizes)}
        self.capture_seconds = time.perf_counter() - started

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
        replay, output = self.graphs[size]
        replay()
        return output[:num_seqs]


def capture_decode_graphs(model: nn.Module, max_num_seqs: int, max_model_len: int,
                          block_size: int, device: torch.device) -> DecodeGraphs | None:
    """The model's decode graphs on this CUDA device, their capture timed and logged; None
    (logged, the executor runs eagerly) when a capture fails."""
    sizes = capture_sizes(max_num_seqs)
    try:
        graphs = DecodeGraphs(model, sizes, max_model_len, block_size, device,
                              cuda_capture(device))
    except RuntimeError as exc:
        log.warning("CUDA graph capture failed: decode steps run eagerly "
                    "(--enforce-eager skips the capture)", error=str(exc))
        return None
    log.info("CUDA graphs captured", batch_sizes=len(sizes), largest=sizes[-1],
             seconds=round(graphs.capture_seconds, 2))
    return graphs
