"""Chat prompts as token ids, the same for the gateway (gateway/pagedserve/gateway/prompts.py) and
the offline engine (`LLM.chat`): no torch, no services."""

from __future__ import annotations

from collections.abc import Sequence


def chat_prompt_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool,
                    tools: Sequence[dict] | None = None) -> list[int]:
    """`messages` (and the functions the model may call, `tools`, in OpenAI's shape) rendered
    with the tokenizer's chat template, then tokenized without adding special tokens: the
    template wrote them."""
    text = tokenizer.apply_chat_template(list(messages), tools=tools and list(tools),
                                         add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
