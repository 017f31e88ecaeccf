"""Incremental detokenization and stop strings: one sequence's text, built token by token.

Why not decode each token on its own: a token is not a unit of text. Byte-level BPE (GPT-2,
Llama 3, SmolLM2) and SentencePiece with byte fallback split one multi-byte UTF-8 character
across several tokens, and SentencePiece decoders drop the "▁" (space) of a text's first token,
so decoding a token alone gives U+FFFD halves and missing spaces. Decoding the whole sequence at
every step is correct but costs O(length) per token.

The technique (as in TGI's `decode_token` and vLLM's incremental detokenizer): keep a small
window of token ids, split at a read offset. Decode the window before the read offset (the
prefix, already returned) and the whole window; the new text is what the whole decode adds to
the prefix decode. Whatever a decoder does at the start of a text (stripping a leading space, a
U+FFFD for a byte cut off from its character) happens to both decodes alike and cancels out, so
the window starts a few tokens into the past, at the prompt's last tokens for the first generated
token. If the whole decode ends in U+FFFD, its last character is still incomplete: the text
before it is returned (it can no longer change), the U+FFFD is not, and the read offset stays
until a later token completes the character. Once every token of the window is text the window
slides: the tokens just read become the next prefix. Each step thus decodes a few tokens, not the
sequence.

Decodes run with `clean_up_tokenization_spaces=False`: that clean-up rewrites text across token
boundaries (" ," -> ","), which would break the prefix arithmetic.

Stop strings are matched on the text: the text of a step is appended to any held-back tail and
searched there (the returned text never ends in the beginning of a stop string, so no match can
start earlier). A tail that could still be the beginning of a stop string is held back until it
either completes the stop string or turns out not to. On a match, the stop string (unless
`include_stop_str_in_output`) and everything after it is dropped, `stopped` turns true, and the
caller aborts the request.
"""

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens the first window reaches back over, so the first generated token decodes in
# context (its leading space, a character begun in the prompt). As in vLLM and TGI.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHARACTER = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...,
               clean_up_tokenization_spaces: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """One sequence's text, built token by token."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        # The window: token ids from the prefix on; those before `_read` are already text.
        context_start = max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0)
        self._window = list(prompt_token_ids[context_start:])
        self._read = len(self._window)
        self._ahead = 0  # characters returned from the unread tokens (before an incomplete one)
        self._held = ""  # decoded text held back as a possible beginning of a stop string
        self._returned: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """Everything returned so far."""
        return "".join(self._returned)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append new token ids; return the new text that is now final (may be ''), holding back
        the bytes of an incomplete character and any tail that could begin a stop string."""
        if self.stopped:
            return ""
        self._window.extend(token_ids)
        return self._release(self._read_window(final=False), final=False)

    def finish(self) -> str:
        """The sequence ended (EOS, length, abort): return all held-back text, but never text at
        or after a matched stop string."""
        if self.stopped:
            return ""
        return self._release(self._read_window(final=True), final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def _read_window(self, final: bool) -> str:
        """The text the window adds to its prefix that was not returned yet, short of a last
        character that is still incomplete (unless `final`). Slides the window once every
        token in it is text."""
        prefix = self._decode(self._window[:self._read])
        whole = self._decode(self._window)
        if final or (len(whole) > len(prefix) and not whole.endswith(REPLACEMENT_CHARACTER)):
            new_text = whole[len(prefix) + self._ahead:]
            self._window = self._window[self._read:]
            self._read, self._ahead = len(self._window), 0
            return new_text
        new_text = whole.rstrip(REPLACEMENT_CHARACTER)[len(prefix) + self._ahead:]
        self._ahead += len(new_text)
        return new_text

    def _release(self, new_text: str, final: bool) -> str:
        """Apply the stop strings to the held-back tail plus `new_text`; return what is final."""
        text = self._held + new_text
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            released, self._held = text[:start + len(stop) if self._include_stop else start], ""
            self.stopped, self.stop_reason = True, stop
        else:
            keep = 0 if final else self._stop_prefix_length(text)
            released, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self._returned.append(released)
        return released

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in `text` (of those, the one starting first),
        with its start: the one token-by-token streaming would have hit, however `text` was
        chunked."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            start = text.find(stop)
            if start != -1 and (best is None or (start + len(stop), start)
                                < (best[0] + len(best[1]), best[0])):
                best = (start, stop)
        return best

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of some stop string."""
        longest = 0
        for stop in self._stop:
            start = max(len(text) - len(stop) + 1, 0)
            while (start := text.find(stop[0], start)) != -1 and len(text) - start > longest:
                if stop.startswith(text[start:]):
                    longest = len(text) - start
                    break
                start += 1
        return longest
