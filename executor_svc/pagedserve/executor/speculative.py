"""Speculative decoding (docs/speculative_decoding.md): the `--speculative-config` the executor
takes (vLLM's JSON keys and method names), and the n-gram proposer (prompt lookup); the
draft-model proposer is draft_model.py.

How a proposal is verified is decided by what the proposer gives: one token per position (a
point mass), never a distribution. Then rejection sampling reduces to drawing the target's own
token at each proposed position and keeping the proposal while the two agree (`accepted_length`):
a proposal d is kept with probability p(d), and on a mismatch the target's draw, which is a draw
from p given that it is not d, is the corrected token, exactly what rejection sampling with a
point-mass proposal gives (a draft model proposes its argmax, for that reason). And since a
seeded draw depends only on the sequence's seed and position (sampler.py), a seeded or greedy
sequence gets the tokens it gets without speculation, token for token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("ngram", "draft_model")
# vLLM's defaults for prompt lookup when neither bound is given.
DEFAULT_PROMPT_LOOKUP = 5
# Each key and the method it applies to ("": every method).
KEYS = {"method": "", "num_speculative_tokens": "", "disable_by_batch_size": "",
        "prompt_lookup_min": "ngram", "prompt_lookup_max": "ngram", "model": "draft_model"}
# More proposals per step than this cost a verification forward more than they can save.
MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfigError(ValueError):
    """A `--speculative-config` that cannot be served; the message names the key."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = DEFAULT_PROMPT_LOOKUP
    prompt_lookup_max: int = DEFAULT_PROMPT_LOOKUP
    # Steps with more running sequences than this verify no proposals (None: never off).
    disable_by_batch_size: int | None = None
    # draft_model: the draft's local directory or GGUF file.
    model: str | None = None


def parse_speculative_config(text: str | dict[str, Any]) -> SpeculativeConfig:
    """`--speculative-config`'s JSON (or the dict LLM(speculative_config=...) takes), checked
    key by key; raises SpeculativeConfigError naming the key at fault."""
    if isinstance(text, str):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpeculativeConfigError(f"--speculative-config is not JSON: {exc}") from None
    else:
        values = dict(text)
    if not isinstance(values, dict):
        raise SpeculativeConfigError("--speculative-config must be a JSON object")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise SpeculativeConfigError(f"--speculative-config: unsupported key(s) "
                                     f"{', '.join(unknown)} (supported: "
                                     f"{', '.join(sorted(KEYS))})")
    # As vLLM: a model and no method means a draft model.
    method = values.get("method", "draft_model" if "model" in values else None)
    if method not in METHODS:
        raise SpeculativeConfigError(f"--speculative-config.method {method!r} is not supported "
                                     f"(supported: {', '.join(METHODS)})")
    misplaced = sorted(key for key in values if KEYS[key] not in ("", method))
    if misplaced:
        raise SpeculativeConfigError(f"--speculative-config.{misplaced[0]} does not apply to "
                                     f"method {method!r}")
    tokens = _positive_int(values, "num_speculative_tokens", required=True)
    if tokens > MAX_SPECULATIVE_TOKENS:
        raise SpeculativeConfigError(f"--speculative-config.num_speculative_tokens {tokens} "
                                     f"exceeds {MAX_SPECULATIVE_TOKENS}")
    disable_by_batch_size = _positive_int(values, "disable_by_batch_size")
    if method == "draft_model":
        model = values.get("model")
        if not isinstance(model, str) or not model:
            raise SpeculativeConfigError("--speculative-config.model: method 'draft_model' "
                                         "needs the draft's local directory or .gguf file")
        return SpeculativeConfig(method, tokens, model=model,
                                 disable_by_batch_size=disable_by_batch_size)
    low = _positive_int(values, "prompt_lookup_min")
    high = _positive_int(values, "prompt_lookup_max")
    if low is None and high is None:
        low = high = DEFAULT_PROMPT_LOOKUP
    low, high = low or high, high or low
    if low > high:
        raise SpeculativeConfigError(f"--speculative-config.prompt_lookup_min {low} exceeds "
                                     f"prompt_lookup_max {high}")
    return SpeculativeConfig(method, tokens, prompt_lookup_min=low, prompt_lookup_max=high,
                             disable_by_batch_size=disable_by_batch_size)


def _positive_int(values: dict[str, Any], key: str, required: bool = False) -> int | None:
    value = values.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpeculativeConfigError(f"--speculative-config.{key} must be a positive integer, "
                                     f"got {value!r}")
    return value


def propose_ngram(token_ids: np.ndarray, num_tokens: int, lookup_min: int,
                  lookup_max: int) -> np.ndarray:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    longest suffix of lookup_min..lookup_max tokens (a longer match first; of equally long ones
    the latest), at most num_tokens of them; empty without a match.

    One pass over the positions holding the last token (the candidates), extending each match
    backwards a token at a time for all candidates at once: ~lookup_max array operations,
    whatever the length of the sequence."""
    length = len(token_ids)
    if length < lookup_min + 1 or num_tokens < 1:
        return token_ids[:0]
    # Candidate ends: earlier positions holding the last token, with a token after them.
    ends = np.flatnonzero(token_ids[:-1] == token_ids[-1])
    if not len(ends):
        return token_ids[:0]
    matched = np.ones(len(ends), dtype=np.int64)  # suffix tokens matched so far
    alive = np.ones(len(ends), dtype=bool)
    for back in range(1, lookup_max):
        starts = ends - back
        alive &= starts >= 0
        alive[alive] &= token_ids[starts[alive]] == token_ids[length - 1 - back]
        if not alive.any():
            break
        matched += alive
    best = matched.max()
    if best < lookup_min:
        return token_ids[:0]
    end = ends[np.flatnonzero(matched == best)[-1]]  # the latest of the longest
    return token_ids[end + 1:end + 1 + num_tokens]


def accepted_length(drafts: list[int], sampled: list[int]) -> int:
    """How many of the proposals the target's own draws confirm: sampled[j] is the target's
    draw at the position of drafts[j] (after drafts[:j]), and the tokens kept are
    sampled[:accepted_length + 1] (the confirmed proposals, then the corrected or bonus one)."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return j
    return len(drafts)
