"""The draft-model proposer (`--speculative-config` method `draft_model`,
docs/speculative_decoding.md): a smaller model with the model's tokenizer, run by the executor
before the model in each step, proposes the next tokens of every decode that may verify some.

**Its KV cache** is its own pool with the target's block ids: a sequence's block table
addresses both, so the scheduler's blocks, lookahead slots, copies (forks) and prefix cache
cover the draft with no bookkeeping of their own. The blocks cost the bytes of both (the pool
is sized so, bootstrap.py).

**What it computes each step.** Every sequence of the step, prefill chunks and decodes
without proposals included, runs through the draft's first forward pass: from the first
position its draft cache lacks to the end of what the target computes this step. So the draft
cache trails the target's by at most one token (the last proposal, when every proposal was
accepted: the draft never ran it), a cached prefix carries the draft's K/V with the target's,
and the first pass holds at most the step's tokens plus one per sequence. Then each sequence
that may verify k proposals takes its argmax there, and k - 1 one-token passes extend the
proposals (sequences wanting fewer drop out).

**Why argmax.** A point-mass proposal is verified by the target's own draws
(speculative.py): the outputs keep the target's distribution, and seeded sequences their
tokens, with no draft probabilities to carry. Sampling proposals from the draft would accept
more at high temperature, at the price of the draft's distribution in every step's state.

Under tensor parallelism rank 0 alone holds the draft and broadcasts the proposals
(runner.py): the draft is too small to gain from being split, and every rank then verifies the
same proposals whatever its arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pagedserve.executor.batch import ScheduledSequence, build_flat_batch


@dataclass
class DraftSequence:
    """One sequence's share of the draft's passes in a step."""

    token_ids: list[int]  # every known token
    num_cached: int  # leading positions whose K/V are in the draft's cache
    end: int  # the draft computes positions num_cached .. end - 1 in its first pass
    block_ids: list[int]
    num_proposals: int  # wanted (0: only keep the cache up to date); at most what fits


class DraftModel:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device,
                 vocab_size: int):
        self.model = model
        self.block_size = block_size
        self.device = device
        # Proposals index the target's vocabulary (a draft may pad its own differently).
        self.vocab_size = vocab_size

    def propose(self, seqs: Sequence[DraftSequence]) -> list[list[int]]:
        """Each sequence's proposals (num_proposals of them for a sequence whose first pass
        ends at its last known token, none otherwise); the draft's cache then holds K/V up to
        each `end`, and of the proposals' positions those it ran (all but the last)."""
        proposing = {i for i, s in enumerate(seqs)
                     if s.num_proposals and s.end == len(s.token_ids)}
        # Single-token sequences first, as the flat batch wants them.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].end - seqs[i].num_cached != 1)
        first = [ScheduledSequence(seqs[i].token_ids[seqs[i].num_cached:seqs[i].end],
                                   seqs[i].num_cached, seqs[i].block_ids) for i in order]
        proposals: list[list[int]] = [[] for _ in seqs]
        for i, token in self._argmax_after(first, order, proposing).items():
            proposals[i].append(token)
        for j in range(1, max((seqs[i].num_proposals for i in proposing), default=0)):
            going = [i for i in sorted(proposing) if seqs[i].num_proposals > j]
            extend = [ScheduledSequence([proposals[i][-1]], seqs[i].end + j - 1,
                                        seqs[i].block_ids) for i in going]
            for i, token in self._argmax_after(extend, going, set(going)).items():
                proposals[i].append(token)
        return proposals

    def _argmax_after(self, batch_seqs: list[ScheduledSequence], indices: list[int],
                      wanted: set[int]) -> dict[int, int]:
        """Runs `batch_seqs` (sequence `indices[k]` is batch_seqs[k]) through the draft; the
        argmax after the last token of each sequence in `wanted`, by index."""
        batch = build_flat_batch(batch_seqs, self.block_size, self.device)
        picks = [k for k, i in enumerate(indices) if i in wanted]
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            if not picks:
                return {}
            rows = batch.last_token_rows[torch.tensor(picks, device=self.device)]
            logits = self.model.compute_logits(hidden[rows])[:, :self.vocab_size]
            tokens = logits.argmax(dim=-1).tolist()
        return {indices[k]: token for k, token in zip(picks, tokens, strict=True)}
