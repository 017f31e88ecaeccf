"""Turning a client's prompt into token ids, and the checks every API applies to them before a
request reaches the scheduler."""

from __future__ import annotations

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.scheduler_client import ServedModel
from pagedserve.runtime import chat


def check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if t >= served.info.vocab_size), None)
    if bad is not None:
        raise GatewayError(400, f"{param}: token id {bad} is outside the vocabulary (size "
                           f"{served.info.vocab_size})", "invalid_request_error", param)


def check_length(served: ServedModel, num_prompt: int, max_tokens: int | None) -> None:
    limit = served.info.max_model_len
    if num_prompt == 0:
        raise GatewayError(400, "prompt: the prompt is empty", "invalid_request_error",
                           "prompt")
    requested = num_prompt + (max_tokens or 1)
    if requested > limit:
        raise GatewayError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {requested} tokens ({num_prompt} in the prompt, {max_tokens or 1} "
            "for the completion). Please reduce the prompt or max_tokens.",
            "invalid_request_error", "max_tokens" if max_tokens else "prompt")


def chat_prompt_ids(served: ServedModel, messages: list[dict],
                    add_generation_prompt: bool) -> list[int]:
    return chat.chat_prompt_ids(served.tokenizer, messages, add_generation_prompt)
