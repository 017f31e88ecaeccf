"""Benchmark requests: random token ids, or a JSONL workload file.

The JSONL format is the one of `benchmarks/workloads/reference.jsonl` (one object per line): a
prompt as `prompt_token_ids` (a list of ids) and/or `prompt` (text), and an output length as
`max_tokens` or `output_len`. Other fields (`id`, `prompt_len`) are ignored. Token ids are sent
as they are when a backend accepts them, so every engine sees exactly the same prompt.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_LEN_FIELDS = ("max_tokens", "output_len")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt (token ids, text or both) and output length."""

    prompt_token_ids: tuple[int, ...] | None
    prompt: str | None
    output_len: int

    @property
    def prompt_len(self) -> int | None:
        """Prompt tokens, when known without a tokenizer."""
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


class DatasetError(ValueError):
    """A workload that cannot be used; the message names the file, line and field."""


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """Bounds of lengths drawn around `length`, as `vllm bench`'s random dataset draws them:
    uniformly in [length * (1 - ratio), length * (1 + ratio)], at least 1."""
    if length < 1:
        raise DatasetError(f"length must be positive, got {length}")
    if not 0 <= range_ratio < 1:
        raise DatasetError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))


def random_requests(num_prompts: int, input_lens: tuple[int, int], output_lens: tuple[int, int],
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    """`num_prompts` prompts of random token ids below `vocab_size`; prompt and output lengths
    uniform within their (inclusive) bounds. The same seed gives the same requests."""
    if num_prompts < 1:
        raise DatasetError(f"--num-prompts must be positive, got {num_prompts}")
    if vocab_size < 1:
        raise DatasetError(f"vocab_size must be positive, got {vocab_size}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        prompt_len, output_len = rng.randint(*input_lens), rng.randint(*output_lens)
        ids = tuple(rng.randrange(vocab_size) for _ in range(prompt_len))
        requests.append(BenchRequest(prompt_token_ids=ids, prompt=None, output_len=output_len))
    return requests


def load_jsonl(path: pathlib.Path, num_prompts: int | None = None) -> list[BenchRequest]:
    """The requests of a JSONL workload, in file order; the first `num_prompts` when given.
    Blank lines are skipped."""
    requests = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if num_prompts is not None and len(requests) == num_prompts:
                break
            if line.strip():
                requests.append(parse_line(line, f"{path}, line {number}"))
    if not requests:
        raise DatasetError(f"{path}: no requests")
    if num_prompts is not None and len(requests) < num_prompts:
        raise DatasetError(f"{path}: --num-prompts {num_prompts} but the file has only "
                           f"{len(requests)} requests")
    return requests


def parse_line(line: str, where: str) -> BenchRequest:
    """One JSONL line; `where` ("FILE, line N") starts every error message."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(item).__name__}")
    ids = _token_ids(item, where)
    text = item.get("prompt")
    if text is not None and not isinstance(text, str):
        raise DatasetError(f"{where}: field 'prompt' must be a string")
    if ids is None and not text:
        raise DatasetError(f"{where}: needs a non-empty 'prompt' or 'prompt_token_ids'")
    return BenchRequest(prompt_token_ids=ids, prompt=text, output_len=_output_len(item, where))


def _token_ids(item: dict, where: str) -> tuple[int, ...] | None:
    ids = item.get("prompt_token_ids")
    if ids is None:
        return None
    if not (isinstance(ids, list) and ids
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise DatasetError(f"{where}: field 'prompt_token_ids' must be a non-empty list of "
                           "non-negative integers")
    return tuple(ids)


def _output_len(item: dict, where: str) -> int:
    name = next((f for f in OUTPUT_LEN_FIELDS if f in item), None)
    if name is None:
        raise DatasetError(f"{where}: needs an output length: field 'max_tokens' or "
                           "'output_len'")
    value = item[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DatasetError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def warmup_requests(requests: Sequence[BenchRequest], count: int,
                    output_len: int = 4) -> list[BenchRequest]:
    """`count` short requests shaped like the workload's first ones but with their prompts
    reversed, so that warming up fills no prefix-cache entry the timed run could hit."""
    return [BenchRequest(prompt_token_ids=None if r.prompt_token_ids is None
                         else r.prompt_token_ids[::-1],
                         prompt=None if r.prompt is None else r.prompt[::-1],
                         output_len=min(output_len, r.output_len))
            for r in (requests[i % len(requests)] for i in range(count))]
