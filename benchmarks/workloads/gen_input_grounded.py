"""Write `input_grounded.jsonl`: requests whose answers copy spans of their prompts, as
summarising, editing or answering from a document does (the workload of issue 20's
speculative-decoding figures in docs/performance.md).

Deterministic: the same seed and `quality_text.txt` give the same bytes on any machine and any
CPython (`random.Random` only). Usage (any Python 3.11):

    python benchmarks/workloads/gen_input_grounded.py           # rewrite the file
    python benchmarks/workloads/gen_input_grounded.py --check   # compare, write nothing

Each request takes one paragraph of the story in `quality_text.txt` (paragraphs of 40 words or
more, in order, cycling) and one of four tasks, in turn:
- copy: repeat the paragraph word for word;
- typos: correct a copy with a few letters swapped in some words (the answer is the original);
- quote: quote the sentence of the paragraph that holds a given word;
- rename: rewrite the paragraph with its first capitalised name replaced by another.

One JSON object per line, as `pagedserve bench serve --dataset jsonl` reads it (chat: send it
with `--backend openai-chat`, the prompt being the user's message):

    {"id": int, "task": str, "prompt": str, "max_tokens": int}

Greedy (temperature 0), EOS not ignored: the answers end where the model ends them, the same
with and without speculation (greedy outputs are identical), so both runs do the same work.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re

HERE = pathlib.Path(__file__).parent
SOURCE = HERE / "quality_text.txt"
OUTPUT = HERE / "input_grounded.jsonl"
SEED = 20
NUM_REQUESTS = 64
MAX_TOKENS = 192
TASKS = ("copy", "typos", "quote", "rename")
NAMES = ("Anna", "Peter", "Joseph", "Clara")


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.split()) >= 40]


def with_typos(paragraph: str, rng: random.Random) -> str:
    """Every eighth or so word of five letters or more with two neighbouring letters swapped."""
    words = paragraph.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 5 and word.isalpha() and rng.random() < 0.125:
            j = rng.randrange(1, len(word) - 2)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return " ".join(words)


def prompt_of(task: str, paragraph: str, rng: random.Random) -> str:
    if task == "copy":
        return f"Copy the following paragraph exactly, word for word.\n\n{paragraph}"
    if task == "typos":
        return ("Correct the spelling mistakes in the following text. Reply with the corrected "
                f"text only.\n\n{with_typos(paragraph, rng)}")
    if task == "quote":
        sentences = re.split(r"(?<=[.!?])\s+", paragraph)
        sentence = sentences[rng.randrange(len(sentences))]
        words = [w.strip(".,;:!?\"'") for w in sentence.split() if len(w) >= 6]
        word = words[rng.randrange(len(words))] if words else sentence.split()[0]
        return (f"Here is a passage.\n\n{paragraph}\n\nQuote, word for word, the sentence of "
                f"the passage that contains the word \"{word}\".")
    names = re.findall(r"\b(Margaret|Thomas|Reed|Hale)\b", paragraph)
    old = names[0] if names else "the keeper"
    new = NAMES[rng.randrange(len(NAMES))]
    return (f"Rewrite the following paragraph, replacing {old} with {new}. Keep every other "
            f"word the same.\n\n{paragraph}")


def build() -> str:
    rng = random.Random(SEED)
    source = paragraphs(SOURCE.read_text(encoding="utf-8"))
    lines = []
    for i in range(NUM_REQUESTS):
        task = TASKS[i % len(TASKS)]
        prompt = prompt_of(task, source[i % len(source)], rng)
        lines.append(json.dumps({"id": i, "task": task, "prompt": prompt,
                                 "max_tokens": MAX_TOKENS}, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed file instead of writing it")
    args = parser.parse_args()
    text = build()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            raise SystemExit(f"{OUTPUT} differs from what this script writes")
        print(f"{OUTPUT} is up to date")
        return
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}: {NUM_REQUESTS} requests")


if __name__ == "__main__":
    main()
