"""Structured output in the executor (docs/structured_output.md): a request's grammar
(pagedserve/runtime/grammars.py), compiled by llguidance, gives each of its sequences a
matcher; before a sequence samples, its matcher writes the mask of the tokens the grammar
allows next, and after, it consumes the tokens the sequence kept (accepted ones only, under
speculative decoding).

Compiling starts in a thread when the request arrives, so it overlaps the prompt's prefill;
the step that first samples the sequence waits only for what is left of it (llguidance builds
its lexer lazily: about a millisecond for the schemas measured in docs/structured_output.md).
Compiled grammars are kept by their text (`GrammarCompiler`); a sequence's matcher is a copy.

A sequence that arrives with generated tokens (recomputed after a preemption, on this executor
or another) or as a fork replays its tokens into its own matcher, so the grammar's state is a
function of the tokens alone, as the sampler's is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from pagedserve.executor.transfers import tensor_on, to_device
from pagedserve.runtime.grammars import LIMITS, GrammarError, grammar_of
from pagedserve.v1 import common_pb2

# Compiled grammars kept (a few hundred KB each for large JSON schemas at most).
CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer in a thread, keeping the last
    CACHED_GRAMMARS by their text. The tokenizer is built in the same thread (seconds, once),
    so neither delays the executor's start or its steps."""

    def __init__(self, make_tokenizer: Callable[[], llguidance.LLTokenizer]):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.tokenizer = self.pool.submit(make_tokenizer)
        self.cache: OrderedDict[str, Future[llguidance.LLMatcher]] = OrderedDict()

    def compile(self, spec: common_pb2.StructuredOutput) -> Future[llguidance.LLMatcher]:
        """The compiled grammar of `spec` (checked with the plan), when it is done."""
        grammar = grammar_of(spec)
        future = self.cache.pop(grammar, None) or self.pool.submit(self._compile, grammar)
        self.cache[grammar] = future
        while len(self.cache) > CACHED_GRAMMARS:
            self.cache.popitem(last=False)
        return future

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer.result(), grammar, log_level=0,
                                       limits=LIMITS)
        if matcher.is_error():
            raise GrammarError("structured_output", matcher.get_error())
        return matcher

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher: a copy of the compiled grammar, fed every token the sequence
    generated."""

    def __init__(self, compiled: Future[llguidance.LLMatcher], generated: Sequence[int]):
        self._compiled = compiled
        self._matcher: llguidance.LLMatcher | None = None
        self._pending = list(generated)  # consumed once the grammar is compiled

    def fork(self) -> SequenceGrammar:
        """A copy in the same state (a fork shares its parent's tokens)."""
        if self._matcher is None:
            return SequenceGrammar(self._compiled, self._pending)
        copy = SequenceGrammar(self._compiled, [])
        copy._matcher = self._matcher.deep_copy()
        return copy

    @property
    def matcher(self) -> llguidance.LLMatcher:
        """The matcher, compiled and caught up (waits for the compile if it is still running)."""
        if self._matcher is None:
            self._matcher = self._compiled.result().deep_copy()
            pending, self._pending = self._pending, []
            self.consume(pending)
        return self._matcher

    def consume(self, tokens: Sequence[int]) -> None:
        """The tokens the sequence kept. The mask allowed each; a matcher that refuses one
        anyway (EOS after the grammar ended, say) is left as it is: it masks by its state."""
        if self._matcher is None:
            self._pending += tokens
        else:
            self._matcher.try_consume_tokens(list(tokens))

    def fill_masks(self, bitmask: torch.Tensor, first_row: int, drafts: Sequence[int]) -> None:
        """The masks of the next len(drafts) + 1 positions into bitmask rows first_row..: after
        the generated tokens, then after each proposal in turn. A proposal the grammar refuses
        leaves the rows after it all-allowed: the target's draw at its row differs from it, so
        nothing after it is kept."""
        matcher = self.matcher
        consumed = 0
        for j in range(len(drafts) + 1):
            row = bitmask[first_row + j]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
            # A refused token would leave the matcher in its error state for good.
            if j == len(drafts) or not _allows(row, drafts[j]):
                break
            matcher.consume_token(drafts[j])
            consumed += 1
        if consumed:
            matcher.rollback(consumed)


def _allows(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """All tokens allowed, one bit each, 32 to an int32."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """-inf on the logits of `rows` (bitmask row k masks logits row rows[k]) for every token
    the mask forbids; tokens past the mask's vocabulary are forbidden too."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).flatten(1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    index = tensor_on(rows, logits.device)
    logits[index] = logits[index].masked_fill(to_device(~allowed[:, :vocab], logits.device),
                                              float("-inf"))
