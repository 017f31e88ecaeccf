"""Batched sampling on the device (docs/design.md §5): one pass over the [S, V] logits of the
sequences that sample this step, each row with its own parameters.

Processing order (vLLM's): the structured-output grammar's mask, logit bias, min_tokens
masking, repetition / presence / frequency penalties, temperature, top-k, top-p, min-p, then
the draw. Python loops run over sequences only,
to build per-row parameter tensors and to draw the noise of seeded rows; work the batch does not
need (penalty tensors, the top-p sort, any randomness for an all-greedy batch) is skipped.

A seeded draw is a function of (seed + sequence index, position) alone (`draw_seed`), where the
position is the number of tokens before the one sampled, prompt included. Nothing else is kept
between steps, so a sequence recomputed after a preemption or on another executor, or
resubmitted with its accepted tokens folded into the prompt, samples what it would have.

Logprobs are the model's raw ones (log-softmax of the logits before any processing), as the
contract's TokenLogprob says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from pagedserve.executor.structured_output import apply_bitmask
from pagedserve.executor.transfers import tensor_on, to_device
from pagedserve.v1 import common_pb2

# Temperatures below this are greedy: dividing by them would overflow the logits.
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class SequenceSamplingState:
    """Per-sequence sampling state, created once when the sequence arrives; the runner appends
    to output_token_ids after each step."""

    params: common_pb2.SamplingParams
    prompt_token_ids: list[int]
    # Generated so far (excludes the token being sampled now).
    output_token_ids: list[int]
    # The model's EOS ids: masked until min_tokens unless ignore_eos.
    eos_token_ids: tuple[int, ...]
    # seed + sequence index (`sequence_seed`); None draws from the global generator.
    seed: int | None
    # Structured output: the tokens its grammar allows at this row, one bit each (int32
    # words, structured_output.py); None: every token.
    token_mask: torch.Tensor | None = None

    @property
    def position(self) -> int:
        """Tokens before the one sampled now, prompt included: the same however the sequence
        got here (decoded, recomputed, or resubmitted with its output as prompt)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64 sampled ids
    # The four below are None when no sequence in the batch asked for logprobs; otherwise they
    # cover every row and the runner keeps those of the rows that asked.
    logprobs: torch.Tensor | None  # [S] float32 raw logprob of each sampled token
    ranks: torch.Tensor | None  # [S] int64 rank of the sampled token (1 = most likely)
    top_ids: torch.Tensor | None  # [S, K] K = most logprobs requested in the batch (may be 0)
    top_logprobs: torch.Tensor | None  # [S, K]


_MASK64 = 2**64 - 1


def sequence_seed(params: common_pb2.SamplingParams, seq_index: int) -> int | None:
    """None unless params has a seed; else seed + seq_index (mod 2**64), so that sequence i of
    an n > 1 request is reproducible on its own (the contract's rule)."""
    if not params.HasField("seed"):
        return None
    return (params.seed + seq_index) & _MASK64


def draw_seed(seed: int, position: int) -> int:
    """The generator seed of a seeded row's draw at `position`: a counter-based stream, keyed by
    the sequence's seed and indexed by position, so no generator state has to survive a
    recompute. Mixed (SplitMix64's finalizer) because the CPU generator keeps only the low 32
    bits of its seed and neighbouring seeds or positions must not give related draws."""
    return _mix64(_mix64(seed) ^ position)


def _mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_logprobs(logits: torch.Tensor, next_token_ids: torch.Tensor,
                    k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [P, V] at prompt positions, next_token_ids [P] the prompt tokens that follow them
    -> (chosen logprobs [P], ranks [P], top ids [P, k], top logprobs [P, k])."""
    return _logprobs_of(logits, next_token_ids, k)


class Sampler:
    def __call__(self, logits: torch.Tensor,
                 seqs: Sequence[SequenceSamplingState]) -> SamplerOutput:
        """logits [S, V] float32, one row per sequence that samples this step (left unchanged)."""
        temperatures = [_temperature(s.params) for s in seqs]
        greedy = [t < _GREEDY_TEMPERATURE for t in temperatures]
        if all(greedy) and not any(map(_changes_logits, seqs)):
            # The common plain-greedy batch: no [S, V] copy to process.
            return _with_logprobs(logits, logits.argmax(dim=-1), seqs)
        processed = process_logits(logits, seqs)
        if all(greedy):
            token_ids = processed.argmax(dim=-1)
        else:
            token_ids = _sample(processed, seqs, temperatures, greedy)
        return _with_logprobs(logits, token_ids, seqs)


def process_logits(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState]) -> torch.Tensor:
    """A float32 copy of logits [S, V] with logit bias, min_tokens masking and penalties applied:
    what greedy takes the argmax of and what temperature then scales."""
    processed = logits.to(torch.float32, copy=True)
    _mask_by_grammar(processed, seqs)
    _add_logit_bias(processed, seqs)
    _mask_min_tokens(processed, seqs)
    _let_grammars_end(processed, seqs)
    _apply_repetition_penalty(processed, seqs)
    _apply_presence_frequency_penalties(processed, seqs)
    return processed


def _changes_logits(seq: SequenceSamplingState) -> bool:
    """Whether process_logits changes this row (bias, min_tokens masking or a penalty)."""
    params = seq.params
    return seq.token_mask is not None or bool(params.logit_bias) \
        or len(seq.output_token_ids) < params.min_tokens \
        or _repetition_penalty(params) != 1.0 or params.presence_penalty != 0.0 \
        or params.frequency_penalty != 0.0


def _temperature(params: common_pb2.SamplingParams) -> float:
    return params.temperature if params.HasField("temperature") else 1.0


def _top_p(params: common_pb2.SamplingParams) -> float:
    return params.top_p if params.HasField("top_p") else 1.0


def _repetition_penalty(params: common_pb2.SamplingParams) -> float:
    return params.repetition_penalty if params.HasField("repetition_penalty") else 1.0


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A [S, 1] column of per-row values, broadcastable against [S, V]."""
    return tensor_on(values, like.device, like.dtype).unsqueeze(1)


def _row_mask(flags: list[bool], like: torch.Tensor) -> torch.Tensor:
    """A [S, 1] boolean column of per-row flags."""
    return tensor_on(flags, like.device).unsqueeze(1)


def _index_tensors(rows: list[int], cols: Iterable[Sequence[int]],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index tensors for every id of cols[j], on row rows[j]; one host-to-device
    copy each, whatever the number of rows."""
    cols = list(cols)
    lengths = torch.tensor([len(c) for c in cols], dtype=torch.long)
    row_index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), lengths)
    col_index = torch.tensor(list(chain.from_iterable(cols)), dtype=torch.long)
    return to_device(row_index, device), to_device(col_index, device)


def _token_counts(logits: torch.Tensor, rows: list[int],
                  token_lists: list[Sequence[int]]) -> torch.Tensor:
    """[S, V] occurrences of each token id in token_lists[j], counted on row rows[j] (a row may
    appear more than once, e.g. for its prompt and its output)."""
    counts = torch.zeros_like(logits)
    row_index, col_index = _index_tensors(rows, token_lists, logits.device)
    ones = torch.ones(len(col_index), dtype=logits.dtype, device=logits.device)
    counts.index_put_((row_index, col_index), ones, accumulate=True)
    return counts


def _mask_by_grammar(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.token_mask is not None]
    if rows:
        apply_bitmask(logits, rows, torch.stack([seqs[i].token_mask for i in rows]))


def _add_logit_bias(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    if not rows:
        return
    biases = [dict(seqs[i].params.logit_bias) for i in rows]
    row_index, col_index = _index_tensors(rows, [list(b) for b in biases], logits.device)
    values = tensor_on(list(chain.from_iterable(b.values() for b in biases)), logits.device,
                       logits.dtype)
    # Keys of one row's map are unique, so accumulating adds each bias exactly once.
    logits.index_put_((row_index, col_index), values, accumulate=True)


def _stop_ids(seq: SequenceSamplingState) -> list[int]:
    """Ids that would end the sequence: EOS (unless ignore_eos) and the stop token ids."""
    eos = () if seq.params.ignore_eos else seq.eos_token_ids
    return [*eos, *seq.params.stop_token_ids]


def _mask_min_tokens(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState]) -> None:
    """Before min_tokens are generated, nothing that would end the sequence may be sampled."""
    rows = [i for i, s in enumerate(seqs) if len(s.output_token_ids) < s.params.min_tokens]
    if not rows:
        return
    row_index, col_index = _index_tensors(rows, [_stop_ids(seqs[i]) for i in rows],
                                          logits.device)
    logits[row_index, col_index] = -math.inf


def _let_grammars_end(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState]) -> None:
    """A grammar whose answer is complete allows only EOS, which min_tokens forbids: the
    grammar wins (EOS allowed again), rather than a row with nothing left to sample."""
    rows = [i for i, s in enumerate(seqs)
            if s.token_mask is not None and len(s.output_token_ids) < s.params.min_tokens]
    if not rows:
        return
    ended = [row for row, dead in zip(rows, torch.isneginf(logits[rows]).all(dim=-1).tolist(),
                                       strict=True) if dead]
    if ended:
        row_index, col_index = _index_tensors(ended, [_stop_ids(seqs[i]) for i in ended],
                                              logits.device)
        logits[row_index, col_index] = 0.0


def _apply_repetition_penalty(logits: torch.Tensor,
                              seqs: Sequence[SequenceSamplingState]) -> None:
    """Tokens of the prompt or output: divide a positive logit, multiply a negative one."""
    penalties = [_repetition_penalty(s.params) for s in seqs]
    rows = [i for i, p in enumerate(penalties) if p != 1.0]
    if not rows:
        return
    token_lists = [t for i in rows for t in (seqs[i].prompt_token_ids, seqs[i].output_token_ids)]
    seen = _token_counts(logits, [i for i in rows for _ in range(2)], token_lists) > 0
    penalty = _row_tensor(penalties, logits)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalised, logits))


def _apply_presence_frequency_penalties(logits: torch.Tensor,
                                        seqs: Sequence[SequenceSamplingState]) -> None:
    """Over output tokens only: logit -= presence * (count > 0) + frequency * count."""
    rows = [i for i, s in enumerate(seqs)
            if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return
    counts = _token_counts(logits, rows, [seqs[i].output_token_ids for i in rows])
    presence = _row_tensor([s.params.presence_penalty for s in seqs], logits)
    frequency = _row_tensor([s.params.frequency_penalty for s in seqs], logits)
    logits -= presence * (counts > 0) + frequency * counts


def _sample(logits: torch.Tensor, seqs: Sequence[SequenceSamplingState],
            temperatures: list[float], greedy: list[bool]) -> torch.Tensor:
    """Token ids for a batch with at least one random row; greedy rows take the argmax of the
    processed logits and ignore temperature and truncation."""
    greedy_ids = logits.argmax(dim=-1) if any(greedy) else None
    # Truncation parameters of greedy rows are treated as disabled so they cost nothing.
    random_params = [None if g else s.params for s, g in zip(seqs, greedy, strict=True)]
    logits /= _row_tensor([1.0 if g else t for t, g in zip(temperatures, greedy, strict=True)],
                          logits)
    _apply_top_k_top_p(logits, [p.top_k if p else 0 for p in random_params],
                       [_top_p(p) if p else 1.0 for p in random_params])
    _apply_min_p(logits, [p.min_p if p else 0.0 for p in random_params])
    sampled = _exponential_race(logits.softmax(dim=-1), seqs, greedy)
    if greedy_ids is None:
        return sampled
    return torch.where(tensor_on(greedy, logits.device), greedy_ids, sampled)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """Keep each row's top_k tokens (k <= 0 or >= V: all), then the smallest set of those whose
    renormalised probability sums to >= top_p (1.0: all). Ties with the k-th logit are kept."""
    vocab = logits.shape[-1]
    k_enabled = [0 < k < vocab for k in top_k]
    p_enabled = [p < 1.0 for p in top_p]
    if any(p_enabled):
        _apply_sorted_top_k_top_p(logits, top_k, k_enabled, top_p, p_enabled)
    elif any(k_enabled):
        _apply_top_k(logits, top_k, k_enabled)


def _kth_largest(descending: torch.Tensor, top_k: list[int],
                 k_enabled: list[bool]) -> torch.Tensor:
    """[S, 1] each row's k-th largest logit, from its values sorted in descending order (at
    least max k of them); -inf on rows without top-k, so that comparing drops nothing there."""
    kth_index = tensor_on([k - 1 if on else 0 for k, on in zip(top_k, k_enabled, strict=True)],
                          descending.device).unsqueeze(1)
    kth = descending.gather(1, kth_index)
    return kth.masked_fill_(~_row_mask(k_enabled, kth), -math.inf)


def _apply_top_k(logits: torch.Tensor, top_k: list[int], k_enabled: list[bool]) -> None:
    """Top-k alone: a partial topk up to the largest k in the batch instead of a full sort."""
    max_k = max(k for k, on in zip(top_k, k_enabled, strict=True) if on)
    kth = _kth_largest(logits.topk(max_k, dim=-1).values, top_k, k_enabled)
    logits.masked_fill_(logits < kth, -math.inf)


def _apply_sorted_top_k_top_p(logits: torch.Tensor, top_k: list[int], k_enabled: list[bool],
                              top_p: list[float], p_enabled: list[bool]) -> None:
    """Top-p needs the sorted distribution; top-k rides on the same sort."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kth = _kth_largest(sorted_logits, top_k, k_enabled)
    sorted_logits.masked_fill_(sorted_logits < kth, -math.inf)

    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A token goes when the more likely ones already reach top_p; the first never does (p > 0).
    # Rows with top_p 1 are left alone: a cumsum may round to 1 before its tail.
    drop = (mass_before >= _row_tensor(top_p, probs)) & _row_mask(p_enabled, probs)
    sorted_logits.masked_fill_(drop, -math.inf)
    logits.scatter_(1, order, sorted_logits)


def _apply_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens with probability < min_p * the top one's, i.e. logit < max + log(min_p):
    no softmax needed, and min_p 0 gives log 0 = -inf, which drops nothing."""
    if not any(p > 0.0 for p in min_p):
        return
    threshold = logits.amax(dim=-1, keepdim=True) + _row_tensor(min_p, logits).log()
    logits.masked_fill_(logits < threshold, -math.inf)


def _exponential_race(probs: torch.Tensor, seqs: Sequence[SequenceSamplingState],
                      skip: list[bool]) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exponential(1) picks token i with probability p_i, without a
    cumsum. A seeded row draws its q from a generator seeded with `draw_seed` of its own seed
    and position, so its noise depends on nothing else (not the batch, not how the sequence got
    here); unseeded rows share one draw from the global generator. Rows in skip (greedy) draw
    nothing."""
    seeded = [row for row, (seq, sk) in enumerate(zip(seqs, skip, strict=True))
              if seq.seed is not None and not sk]
    unseeded = any(s.seed is None and not sk for s, sk in zip(seqs, skip, strict=True))
    q = torch.empty_like(probs).exponential_() if unseeded else torch.ones_like(probs)
    if seeded:
        # One generator, re-seeded per row: draw_seed + manual_seed take ~2 us on the host
        # (measured on CPU; no device work), far below the exponential_ it precedes.
        generator = torch.Generator(device=probs.device)
        for row in seeded:
            generator.manual_seed(draw_seed(seqs[row].seed, seqs[row].position))
            q[row].exponential_(generator=generator)
    # q == 0 would give 0 / 0 = NaN for a masked token, and argmax picks NaN.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def _with_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   seqs: Sequence[SequenceSamplingState]) -> SamplerOutput:
    requested = [s.params.logprobs for s in seqs if s.params.HasField("logprobs")]
    if not requested:
        return SamplerOutput(token_ids, None, None, None, None)
    return SamplerOutput(token_ids, *_logprobs_of(logits, token_ids, max(requested)))


def _logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logprobs of token_ids[i] under row i, its rank (1 + tokens strictly more likely),
    and the row's k most likely tokens with their logprobs."""
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top = logprobs.topk(k, dim=-1)
    return chosen.squeeze(1), ranks, top.indices, top.values
