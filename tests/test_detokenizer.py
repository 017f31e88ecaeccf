"""Incremental detokenization and stop strings (gateway/pagedserve/gateway/detokenizer.py), checked
against the tokenizers' own full decode: a byte-level BPE tokenizer whose multi-byte characters are
single byte tokens, the real SmolLM2 tokenizer of the default model, and two SentencePiece-style
tokenizers with byte fallback (Llama's decoder chain with its leading-space strip, and Metaspace).

The reference for a stream is what the generated ids add to the full decode of the prompt: the
generated ids decode in the prompt's context (a SentencePiece "▁" at the start of the answer is
a space, not stripped). For byte-level tokenizers that equals decoding the generated ids alone."""

import functools
import itertools
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagedserve.executor.model_files import default_cache_dir, resolve_model
from pagedserve.gateway.detokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from pagedserve.testing.tiny_models import byte_level_tokenizer

FFFD = "\ufffd"
TEXTS = [
    "Hello, world! The answer is 42.",
    "héllo wörld, naïve café; Ærøskøbing, ça va?",
    "你好，世界。今日はいい天気ですね。한국어",
    "emoji 🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 end",
    "mixed \t tabs\n\nnew  lines \r\n  and   spaces ",
    "Ελληνικά и кириллица ✓ — “quotes” …",
]
ALPHABET = "abz AZ09.,!?\n\t  éüßñ你好世界日本語한🎉🚀👍🏽✓—€"


def sentencepiece_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with byte fallback: letters, "▁" and a few merges; everything
    else decodes from <0xNN> byte tokens. "llama": Llama's normalizer and decoder chain
    (Replace, ByteFallback, Fuse, Strip one leading space); "metaspace": the Metaspace ones."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for symbol in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'":
        vocab[symbol] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("▁", "▁")]
    vocab.update({left + right: len(vocab) + i for i, (left, right) in enumerate(merges)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                     unk_token="<unk>"))
    if style == "llama":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                     normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        tokenizer.decoder = decoders.Sequence([
            decoders.Metaspace(prepend_scheme="first", split=False), decoders.ByteFallback(),
            decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def smollm2_tokenizer() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(resolve_model(None, default_cache_dir()).path)


TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    name: functools.cache(make) for name, make in {
        "byte-level": byte_level_tokenizer,
        "smollm2": smollm2_tokenizer,
        "sentencepiece-llama": functools.partial(sentencepiece_tokenizer, "llama"),
        "sentencepiece-metaspace": functools.partial(sentencepiece_tokenizer, "metaspace"),
    }.items()}
BYTE_LEVEL = ("byte-level", "smollm2")


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def named_tokenizer(request) -> tuple[str, PreTrainedTokenizerFast]:
    return request.param, TOKENIZERS[request.param]()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def prompts(tokenizer) -> list[list[int]]:
    """No prompt, a plain one, and one ending in a special token (a chat turn's start)."""
    return [[], encode(tokenizer, "Say something:"),
            encode(tokenizer, f"Hi!{tokenizer.eos_token}") + [tokenizer.bos_token_id]]


def reference(tokenizer, prompt: list[int], generated: list[int], skip: bool = True) -> str:
    """What `generated` adds to the prompt's text, by two full decodes."""
    head = tokenizer.decode(prompt, skip_special_tokens=skip)
    whole = tokenizer.decode(prompt + generated, skip_special_tokens=skip)
    assert whole.startswith(head)
    return whole[len(head):]


def random_chunks(ids: Sequence[int], rng: random.Random) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        size = rng.randint(1, 6)
        chunks.append(list(ids[i:i + size]))
        i += size
    return chunks


def stream(detokenizer: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    """The deltas of `chunks`, then finish()'s."""
    return [detokenizer.add(chunk) for chunk in chunks] + [detokenizer.finish()]


def assert_streams_like_full_decode(tokenizer, prompt: list[int], generated: list[int],
                                    skip: bool, rng: random.Random) -> None:
    expected = reference(tokenizer, prompt, generated, skip)
    for chunks in ([[i] for i in generated], random_chunks(generated, rng)):
        deltas = stream(IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip),
                        chunks)
        assert "".join(deltas) == expected
        if FFFD not in expected:
            assert not any(FFFD in delta for delta in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_the_full_decode(named_tokenizer, skip):
    name, tokenizer = named_tokenizer
    rng = random.Random(0)
    for text in TEXTS:
        middle = len(text) // 2  # a special token mid-stream, and EOS at the end
        generated = (encode(tokenizer, text[:middle]) + [tokenizer.eos_token_id]
                     + encode(tokenizer, text[middle:]) + [tokenizer.eos_token_id])
        for prompt in prompts(tokenizer):
            assert_streams_like_full_decode(tokenizer, prompt, generated, skip, rng)
            if name in BYTE_LEVEL:
                assert reference(tokenizer, prompt, generated, skip) == tokenizer.decode(
                    generated, skip_special_tokens=skip)


def test_text_is_returned_as_soon_as_it_is_final(named_tokenizer):
    """After each token, the text returned so far holds all of the full decode up to that token
    but a last character that is still incomplete (the decode ends in U+FFFD), and no more."""
    _, tokenizer = named_tokenizer
    for text in TEXTS:
        prompt, generated = encode(tokenizer, "Go:"), encode(tokenizer, text)
        full = reference(tokenizer, prompt, generated)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        for k, token_id in enumerate(generated, start=1):
            detokenizer.add([token_id])
            so_far = reference(tokenizer, prompt, generated[:k]).rstrip(FFFD)
            assert detokenizer.text.startswith(so_far) and full.startswith(detokenizer.text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30), seed=st.integers(0, 2**16))
def test_random_unicode_streams_like_the_full_decode(named_tokenizer, text, seed):
    _, tokenizer = named_tokenizer
    rng = random.Random(seed)
    prompt = rng.choice(prompts(tokenizer))
    assert_streams_like_full_decode(tokenizer, prompt, encode(tokenizer, text), True, rng)


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece-llama"])
def test_tokens_that_split_a_character_return_nothing_until_it_completes(name):
    tokenizer = TOKENIZERS[name]()
    pieces = ["é", "🎉", "你", "a"]
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Go"))
    for piece in pieces:
        ids = encode(tokenizer, "a" + piece)[1:] if name == "byte-level" else \
            [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in piece.encode()]
        assert len(ids) == len(piece.encode())  # one token per byte
        assert [detokenizer.add([i]) for i in ids] == [""] * (len(ids) - 1) + [piece]


def test_text_before_an_incomplete_character_in_the_same_token_is_not_held():
    """SmolLM2's "ĠðŁ" is a space and half an emoji: the space is returned (and can complete a
    stop string) at that token, the emoji once it completes."""
    tokenizer = TOKENIZERS["smollm2"]()
    generated = encode(tokenizer, "a 🎉 ok")
    assert tokenizer.convert_ids_to_tokens(generated)[1] == "ĠðŁ"
    deltas = stream(IncrementalDetokenizer(tokenizer, []), [[i] for i in generated])
    assert deltas == ["a", " ", "", "🎉", " ok", ""]
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[" "])
    assert [detokenizer.add([i]) for i in generated[:2]] == ["a", ""] and detokenizer.stopped


def test_invalid_bytes_are_released_as_the_full_decode_has_them():
    """A character cut short by another one, or by the end: its U+FFFD comes once it is sure."""
    tokenizer = TOKENIZERS["byte-level"]()
    lead, continuation = encode(tokenizer, "你")[:2]
    ok = encode(tokenizer, "ok")
    for generated, deltas in (([lead] + ok, ["", FFFD + "o", "k", ""]),
                              (ok + [lead, continuation], ["o", "k", "", "", FFFD])):
        assert "".join(deltas) == tokenizer.decode(generated)
        assert stream(IncrementalDetokenizer(tokenizer, []), [[i] for i in generated]) == deltas


@pytest.mark.parametrize("prompt_text", ["Say", "a"])
def test_first_token_decodes_in_the_prompts_context(prompt_text):
    """Llama's decoder strips a text's leading space: alone, "▁hello" decodes to "hello", but
    after a prompt the answer starts with a space, even after a prompt of one token ("▁a")."""
    tokenizer = TOKENIZERS["sentencepiece-llama"]()
    prompt, generated = encode(tokenizer, prompt_text), encode(tokenizer, "hello there")
    assert tokenizer.decode(generated) == "hello there"
    assert "".join(stream(IncrementalDetokenizer(tokenizer, prompt), [[i] for i in generated])) \
        == " hello there"
    assert len(encode(tokenizer, "a")) == 1


def test_special_tokens_are_skipped_unless_asked_for():
    tokenizer = TOKENIZERS["byte-level"]()
    generated = encode(tokenizer, "hi") + [tokenizer.eos_token_id]
    for detokenizer, text in [(IncrementalDetokenizer(tokenizer, []), "hi"),
                              (IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False),
                               "hi" + tokenizer.eos_token)]:
        assert "".join(stream(detokenizer, [[i] for i in generated])) == text


def test_tokenization_space_clean_up_is_never_applied():
    """The clean-up (" ," -> ",") rewrites text across token boundaries, so a tokenizer that
    asks for it (WordPiece ones do; transformers only forces it on BPE) streams its raw decode."""
    tokenizer = byte_level_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    generated = encode(tokenizer, "Hello , world . Yes !")
    raw = tokenizer.decode(generated, clean_up_tokenization_spaces=False)
    assert tokenizer.decode(generated) != raw
    assert "".join(stream(IncrementalDetokenizer(tokenizer, []), [[i] for i in generated])) == raw


class RecordingTokenizer:
    """Passes decodes through and records the longest list of ids decoded at once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def decode(self, token_ids: list[int], **kwargs) -> str:
        self.longest = max(self.longest, len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def test_each_step_decodes_a_few_tokens_not_the_sequence():
    tokenizer = TOKENIZERS["byte-level"]()
    recording = RecordingTokenizer(tokenizer)
    prompt, generated = encode(tokenizer, "a long prompt " * 20), encode(tokenizer, "你好 🎉 " * 50)
    deltas = stream(IncrementalDetokenizer(recording, prompt), [[i] for i in generated])
    assert "".join(deltas) == tokenizer.decode(generated)
    assert recording.longest <= PROMPT_CONTEXT_TOKENS + 8  # a 4-byte emoji held, plus its prefix


# Stop strings. The byte-level tokenizer has (almost) one token per byte, so every stop string
# spans token boundaries.

def byte_level_stream(text: str, stop: Sequence[str], include: bool = False,
                      ) -> tuple[IncrementalDetokenizer, list[str], int | None]:
    """Streams `text` one token at a time: the detokenizer, the deltas (without finish()'s) and
    the index of the token at which `stopped` turned true."""
    tokenizer = TOKENIZERS["byte-level"]()
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Q:"), stop=stop,
                                         include_stop_str_in_output=include)
    deltas, stopped_at = [], None
    for k, token_id in enumerate(encode(tokenizer, text)):
        deltas.append(detokenizer.add([token_id]))
        if detokenizer.stopped and stopped_at is None:
            stopped_at = k
    return detokenizer, deltas, stopped_at


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    detokenizer, deltas, stopped_at = byte_level_stream("Hello STOP world", ["STOP"])
    assert stopped_at == len("Hello STOP") - 1
    assert detokenizer.stop_reason == "STOP"
    assert detokenizer.text == "".join(deltas) == "Hello "
    assert deltas[len("Hello S") - 1:] == [""] * len("STOP world")  # "S" on was held back
    assert detokenizer.add(encode(TOKENIZERS["byte-level"](), "more")) == ""
    assert detokenizer.finish() == ""


def test_include_stop_str_in_output_keeps_the_stop_string():
    detokenizer, deltas, _ = byte_level_stream("Hello STOP world", ["STOP"], include=True)
    assert detokenizer.text == "".join(deltas) == "Hello STOP"


def test_a_multibyte_stop_string_fires_at_its_last_byte():
    detokenizer, _, stopped_at = byte_level_stream("Hi 你好!", ["你好"])
    assert stopped_at == len("Hi 你好".encode()) - 1
    assert detokenizer.text == "Hi "


def test_held_back_text_is_released_when_it_stops_matching_and_at_finish():
    detokenizer, deltas, stopped_at = byte_level_stream("ST STALL ST", ["STOP"])
    assert stopped_at is None
    assert deltas == ["", "", "ST ", "", "", "STA", "L", "L", " ", "", ""]
    assert detokenizer.finish() == "ST"
    assert detokenizer.text == "ST STALL ST" and detokenizer.stopped is False
    assert detokenizer.stop_reason is None


def test_a_stop_string_whose_beginning_repeats_is_held_back_whole():
    """Of "aab", the tail "aa" is a beginning (not only "a"): both are held back, so the stop
    string still fires when "b" comes."""
    detokenizer, deltas, stopped_at = byte_level_stream("xaab", ["aab"])
    assert (deltas, stopped_at, detokenizer.text) == (["x", "", "", ""], 3, "x")
    # Of "abab" after "zaab", the tail "aab" is no beginning but "ab" is: it is held back.
    detokenizer, deltas, stopped_at = byte_level_stream("zaabab", ["abab"])
    assert (deltas, stopped_at, detokenizer.text) == (["z", "", "a", "", "", ""], 5, "za")


@pytest.mark.parametrize("stop", [["world", "lo"], ["lo", "world"]])
def test_the_earliest_stop_string_in_the_text_wins(stop):
    detokenizer, _, stopped_at = byte_level_stream("Hello world", stop)
    assert (detokenizer.stop_reason, detokenizer.text, stopped_at) == ("lo", "Hel", 4)


def test_overlapping_stop_strings_resolve_alike_however_tokens_arrive():
    """The stop string that completes first wins, whether "xabcd" arrives token by token or at
    once: "bc" ends before "abcd" does."""
    tokenizer = TOKENIZERS["byte-level"]()
    generated = encode(tokenizer, "xabcd")
    for chunks in ([[i] for i in generated], [generated]):
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["abcd", "bc"])
        assert "".join(stream(detokenizer, chunks)) == "xa"
        assert detokenizer.stop_reason == "bc"


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="^stop strings must not be empty$"):
        IncrementalDetokenizer(TOKENIZERS["byte-level"](), [], stop=["ok", ""])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=st.text(alphabet=ALPHABET, min_size=1, max_size=30),
       include=st.booleans())
def test_stop_strings_fire_where_the_full_decode_first_contains_one(
        named_tokenizer, data, text, include):
    """Against full decodes at every point the stream could stop (after each token, or each
    random chunk): it stops at the first whose decode contains a stop string, and its text ends
    where the stop string that completes first starts (or ends, with
    include_stop_str_in_output)."""
    _, tokenizer = named_tokenizer
    prompt, generated = encode(tokenizer, "Go:"), encode(tokenizer, text)
    full = reference(tokenizer, prompt, generated)
    substring = st.integers(0, len(full) - 1).flatmap(
        lambda i: st.integers(i + 1, min(i + 4, len(full))).map(lambda j: full[i:j]))
    stop = data.draw(st.lists(substring | st.text(alphabet=ALPHABET, min_size=1, max_size=3),
                              min_size=1, max_size=3).filter(lambda s: FFFD not in "".join(s)))
    rng = random.Random(data.draw(st.integers(0, 2**16)))
    for chunks in ([[i] for i in generated], random_chunks(generated, rng)):
        ends = list(itertools.accumulate(len(chunk) for chunk in chunks))
        decodes = [reference(tokenizer, prompt, generated[:end]) for end in ends]
        fires = next((n for n, so_far in enumerate(decodes) if any(s in so_far for s in stop)),
                     None)
        expected, reason = full, None
        if fires is not None:
            so_far = decodes[fires]
            end, start, reason = min((so_far.find(s) + len(s), so_far.find(s), s)
                                     for s in stop if s in so_far)
            expected = so_far[:end if include else start]
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, stop=stop,
                                             include_stop_str_in_output=include)
        stopped = []
        for chunk in chunks:
            detokenizer.add(chunk)
            stopped.append(detokenizer.stopped)
        detokenizer.finish()
        assert (detokenizer.text, detokenizer.stop_reason) == (expected, reason)
        assert (stopped.index(True) if any(stopped) else None) == fires
