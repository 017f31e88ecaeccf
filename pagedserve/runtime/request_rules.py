"""The one set of rules a request must meet before it is queued, shared by the gateway (its HTTP
and gRPC APIs, against the limits the scheduler relays from the executors) and the scheduler's
admission (against the executor a request lands on). One checker, so the two APIs cannot drift
apart and no caller of the scheduler's Submit can send an executor a plan it would refuse
(docs/design.md §6).

Errors name the `SamplingParams` field; each API maps that name to the one its clients sent
(HTTP `top_logprobs`, gRPC `sampling.logprobs`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pagedserve.runtime.grammars import GrammarError, check_spec
from pagedserve.v1 import common_pb2

# Request-size ceilings: far above what a real request needs, low enough that checking and
# carrying one costs little.
MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
LOGIT_BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0
# |priority| at most this, where priorities are allowed at all (the gateway's
# --allow-client-priority); the scheduler refuses anything beyond it from any caller.
MAX_PRIORITY = 1000
MAX_CACHE_SALT_CHARS = 256

# A scheduler-side request id: the gateway's own (e.g. "cmpl-<hex>-0"). No "/", which joins a
# request id and a sequence index into a sequence id ("<id>/<i>"), so ids never collide.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RuleError(ValueError):
    """A request field breaks a rule; `field` is its SamplingParams (or request) name."""

    def __init__(self, field: str, rule: str):
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class SamplingLimits:
    """What the executor serving a request can honour."""

    vocab_size: int
    max_logprobs: int
    max_n: int = MAX_N

    @classmethod
    def for_executor(cls, vocab_size: int, max_logprobs: int,
                     max_num_seqs: int) -> SamplingLimits:
        """The limits of an executor that runs at most `max_num_seqs` sequences a step (0:
        not known): n stays within both that and MAX_N, for every caller alike."""
        return cls(vocab_size, max_logprobs,
                   min(MAX_N, max_num_seqs) if max_num_seqs else MAX_N)


def check_sampling(params: common_pb2.SamplingParams, limits: SamplingLimits) -> None:
    """Raises RuleError naming the first field of `params` out of its range (NaN and infinities
    included) or over a count limit."""
    for field, broken, rule in _rules(params, limits):
        if broken():
            raise RuleError(field, rule)
    if params.HasField("structured_output"):
        try:
            check_spec(params.structured_output)
        except GrammarError as exc:
            raise RuleError(exc.field, exc.reason) from None


def _rules(p: common_pb2.SamplingParams, limits: SamplingLimits):
    """(field, is-it-broken, rule) in field order; each check runs only when reached, so a
    count is checked before the entries it counts."""
    vocab = limits.vocab_size

    def optional(name: str, default: float) -> float:
        return getattr(p, name) if p.HasField(name) else default

    def outside_vocab(ids) -> bool:
        return any(t >= vocab for t in ids)

    yield ("max_tokens", lambda: p.HasField("max_tokens") and p.max_tokens == 0, "must be >= 1")
    yield ("min_tokens", lambda: p.HasField("max_tokens") and p.min_tokens > p.max_tokens,
           "must be <= max_tokens")
    yield ("temperature", lambda: not _finite(optional("temperature", 1.0), 0.0, inclusive=True),
           "must be a finite number >= 0")
    yield ("top_p", lambda: not 0.0 < optional("top_p", 1.0) <= 1.0, "must be in (0, 1]")
    yield ("top_k", lambda: p.top_k < -1, "must be >= -1 (0 or -1: disabled)")
    yield ("min_p", lambda: not 0.0 <= p.min_p <= 1.0, "must be in [0, 1]")
    yield ("repetition_penalty",
           lambda: not _finite(optional("repetition_penalty", 1.0), 0.0, inclusive=False),
           "must be a finite number > 0")
    for name in ("presence_penalty", "frequency_penalty"):
        yield (name, lambda name=name: not -PENALTY_LIMIT <= getattr(p, name) <= PENALTY_LIMIT,
               f"must be in [{-PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]")
    yield ("logit_bias", lambda: len(p.logit_bias) > MAX_LOGIT_BIAS,
           f"at most {MAX_LOGIT_BIAS} entries")
    yield ("logit_bias", lambda: outside_vocab(p.logit_bias),
           f"keys must be token ids below the vocabulary size {vocab}")
    yield ("logit_bias",
           lambda: any(not -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT
                       for v in p.logit_bias.values()),
           f"values must be in [{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]")
    yield ("stop", lambda: len(p.stop) > MAX_STOP_STRINGS
           or any(not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in p.stop),
           f"at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_STRING_CHARS} characters")
    yield ("stop_token_ids", lambda: len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS,
           f"at most {MAX_STOP_TOKEN_IDS} token ids")
    yield ("stop_token_ids", lambda: outside_vocab(p.stop_token_ids),
           f"token ids must be below the vocabulary size {vocab}")
    for name in ("logprobs", "prompt_logprobs"):
        yield (name, lambda name=name: optional(name, 0) > limits.max_logprobs,
               f"must be <= {limits.max_logprobs} (the executor's --max-logprobs)")
    yield ("n", lambda: p.n > limits.max_n, f"must be <= {limits.max_n}")
    yield ("pooling.type", lambda: p.HasField("pooling") and p.pooling.type not in
           (common_pb2.Pooling.TYPE_LAST, common_pb2.Pooling.TYPE_MEAN), "must be LAST or MEAN")
    yield ("pooling", lambda: p.HasField("pooling") and p.n > 1, "needs n = 1")


def _finite(value: float, low: float, inclusive: bool) -> bool:
    """Whether `value` is finite and above `low` (or equal to it, with `inclusive`); NaN is
    not."""
    return math.isfinite(value) and (value >= low if inclusive else value > low)


def check_priority(priority: int) -> None:
    """Raises RuleError when `priority` is outside [-MAX_PRIORITY, MAX_PRIORITY]."""
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise RuleError("priority", f"must be in [{-MAX_PRIORITY}, {MAX_PRIORITY}]")


def check_request_id(request_id: str) -> None:
    """Raises RuleError unless `request_id` is 1 to 128 characters of [A-Za-z0-9._:-]."""
    if not REQUEST_ID.fullmatch(request_id):
        raise RuleError("request_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")


def check_cache_salt(salt: str) -> None:
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise RuleError("cache_salt", f"at most {MAX_CACHE_SALT_CHARS} characters")
