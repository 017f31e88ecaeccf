"""Driving a model of `pagedserve.executor.models` through the paged KV path, and checking it
against `transformers` on the same weights: one flat batch of prompts of different lengths (whole or
in chunks), then batched greedy decode steps (optionally replayed from CPU graphs)."""

import torch

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch
from pagedserve.executor.decode_graphs import (
    CpuCapture,
    DecodeGraphs,
    check_replays,
    cpu_capture_sizes,
)
from pagedserve.executor.models.layers import bind_kv_caches, kv_cache_shape

BLOCK = 4
NUM_BLOCKS = 64
MAX_GRAPH_SEQS = 8


class PagedRun:
    """Drives the model step by step with a trivial block allocator (each sequence takes
    fresh blocks as it grows). With `graphs`, decode-only steps replay CPU graphs of the model
    (its kernels the C set), captured and checked as the executor does (each size by its first
step); `replays` counts the steps they served."""

    def __init__(self, model, graphs: bool = False):
        self.model = model
        self.free = list(range(NUM_BLOCKS))[::-1]
        caches = [(torch.zeros(shape), torch.zeros(shape))
                  for shape in kv_cache_shape(model, NUM_BLOCKS, BLOCK)]
        bind_kv_caches(model, caches)
        self.graphs, self.replays = None, 0
        if graphs:
            self.graphs = DecodeGraphs(model, cpu_capture_sizes(MAX_GRAPH_SEQS),
                                       NUM_BLOCKS * BLOCK, BLOCK, torch.device("cpu"),
                                       CpuCapture(), lazy=True)
            check_replays(self.graphs, model)

    def step(self, work: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
        """work: (block_table, tokens to compute, num_computed) per sequence; returns the
        logits after each sequence's last token."""
        seqs = []
        for table, tokens, computed in work:
            while len(table) * BLOCK < computed + len(tokens):
                table.append(self.free.pop())
            seqs.append(ScheduledSequence(tokens, computed, table))
        batch = build_flat_batch(seqs, BLOCK)
        with torch.no_grad():
            hidden = None if self.graphs is None else self.graphs.run(batch)
            if hidden is None:
                hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            else:
                self.replays += 1
            return self.model.compute_logits(hidden[batch.last_token_rows])


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0, -1]


def prefill(run: PagedRun, prompts: list[list[int]], chunk: int | None):
    """Every prompt in each step, whole or `chunk` tokens at a time, decodes-first ordering.
    Returns (block tables, logits after each prompt)."""
    tables: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    logits = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        # sequences with one token left to compute go to the front, as decodes do
        active.sort(key=lambda i: min(chunk or 10**9, len(prompts[i]) - done[i]) != 1)
        work = []
        for i in active:
            n = min(chunk or 10**9, len(prompts[i]) - done[i])
            work.append((tables[i], prompts[i][done[i]:done[i] + n], done[i]))
        out = run.step(work)
        for row, i in enumerate(active):
            done[i] += len(work[row][1])
            logits[i] = out[row]
    return tables, logits


def assert_matches_transformers(model, hf_model, prompts: list[list[int]], chunk: int | None,
                                decode_steps: int = 6, tol: float = 1e-4,
                                graphs: bool = False) -> None:
    """Prefill every prompt in one flat batch (whole or chunked), then `decode_steps` batched
    greedy decode steps (replayed from CPU graphs with `graphs`); the logits after every step
    match transformers' within `tol`."""
    run = PagedRun(model, graphs)
    tables, logits = prefill(run, prompts, chunk)
    sequences = [list(p) for p in prompts]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], reference_logits(hf_model, p), rtol=tol, atol=tol,
                                   msg=lambda m, i=i: f"prefill of prompt {i}: {m}")
    for step in range(decode_steps):
        for i, seq in enumerate(sequences):
            seq.append(int(logits[i].argmax()))
        logits = run.step([(tables[i], [seq[-1]], len(seq) - 1)
                           for i, seq in enumerate(sequences)])
        for i, seq in enumerate(sequences):
            torch.testing.assert_close(
                logits[i], reference_logits(hf_model, seq), rtol=tol, atol=tol,
                msg=lambda m, i=i, step=step: f"decode step {step} of sequence {i}: {m}")
    assert run.replays == (decode_steps if graphs else 0)
