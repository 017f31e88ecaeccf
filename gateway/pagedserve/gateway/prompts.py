"""Turning a client's prompt into token ids, and the checks every API applies before a request
reaches the scheduler.

Tokenizing and rendering a chat template are CPU work on inputs as large as a request body
(16 MiB over HTTP, 64 MiB over gRPC): on the event loop they would stall every stream and probe
the gateway serves meanwhile. So a prompt's length in characters is checked first, against
what the model's context could ever hold, and the work then runs on the tokenizer thread."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import jinja2

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.scheduler_client import ServedModel
from pagedserve.runtime import chat
from pagedserve.runtime.request_rules import RuleError, SamplingLimits, check_sampling
from pagedserve.v1 import common_pb2

# A prompt longer than this many characters per token of the model's context can never fit:
# it is refused before it is tokenized. A token is a few characters on average; only a text
# made mostly of the longest tokens (long runs of one character) comes near this.
MAX_CHARS_PER_TOKEN = 32
# One thread: a huge prompt then delays other prompts' tokenization, never a stream, and a
# transformers tokenizer is never used from two threads at once (its Rust core refuses some
# concurrent uses with "Already borrowed").
_TOKENIZER_THREAD = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

T = TypeVar("T")


async def off_loop(work: Callable[[], T]) -> T:
    """`work()`, run on the tokenizer thread while the event loop serves everything else."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_THREAD, work)


def check_chars(served: ServedModel, num_chars: int, param: str) -> None:
    limit = MAX_CHARS_PER_TOKEN * served.info.max_model_len
    if num_chars > limit:
        raise GatewayError(400, f"{param}: {num_chars} characters cannot fit this model's "
                           f"context of {served.info.max_model_len} tokens (at most {limit} "
                           "characters are read)", "invalid_request_error", param)


async def text_prompt_ids(served: ServedModel, text: str, param: str,
                          add_special_tokens: bool = True) -> list[int]:
    check_chars(served, len(text), param)
    return await off_loop(lambda: served.tokenizer(
        text, add_special_tokens=add_special_tokens).input_ids)


def conversation_chars(messages: list[dict], tools: list[dict] | None) -> int:
    """What a chat sends the template, in characters: its turns' content, their calls'
    arguments and the tools' definitions."""
    arguments = sum(len(json.dumps(call["function"]["arguments"]))
                    for m in messages for call in m.get("tool_calls", ()))
    return sum(len(m["content"]) for m in messages) + arguments \
        + (len(json.dumps(tools)) if tools else 0)


async def chat_prompt_ids(served: ServedModel, messages: list[dict], add_generation_prompt: bool,
                          param: str = "messages", tools: list[dict] | None = None) -> list[int]:
    """The chat (with the functions it may call, `tools`) rendered with the model's template
    and tokenized; a 400 naming `param` for a model without a template, or a conversation its
    template refuses (it raised)."""
    check_chars(served, conversation_chars(messages, tools), param)
    if not getattr(served.tokenizer, "chat_template", None):
        raise GatewayError(400, f"{param}: model {served.info.model_id!r} has no chat template; "
                           "use the completions API with a text prompt",
                           "invalid_request_error", param)
    try:
        return await off_loop(lambda: chat.chat_prompt_ids(served.tokenizer, messages,
                                                            add_generation_prompt, tools))
    except jinja2.TemplateError as exc:
        raise GatewayError(400, f"{param}: the model's chat template refused the conversation: "
                           f"{exc}", "invalid_request_error", param) from None


# Chat roles; `developer` is OpenAI's newer name for `system`, which templates know.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _invalid(param: str, reason: str) -> GatewayError:
    return GatewayError(400, f"{param}: {reason}", "invalid_request_error", param)


def template_message(role: str, content: str | None, param: str, *, name: str | None = None,
                     tool_calls: Sequence[tuple[str, str, str]] = (),
                     tool_call_id: str | None = None) -> dict:
    """A chat turn as templates read it, from either API (`param`: where the turn is in the
    request); a 400 naming the field a turn gets wrong. `tool_calls`: an assistant turn's calls
    as (id, name, arguments JSON); a tool turn answers the call `tool_call_id`."""
    if role not in CHAT_ROLES:
        raise _invalid(f"{param}.role", f"unknown role {role!r}")
    if content is None and not (role == "assistant" and tool_calls):
        raise _invalid(f"{param}.content", f"required in a {role} message (only an assistant "
                       "message with tool_calls may leave it out)")
    if tool_calls and role != "assistant":
        raise _invalid(f"{param}.tool_calls", "only in assistant messages")
    if role == "tool" and not tool_call_id:
        raise _invalid(f"{param}.tool_call_id", "required in a tool message")
    message = {"role": "system" if role == "developer" else role, "content": content or ""}
    if name:
        message["name"] = name
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    if tool_calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {
                "name": call_name, "arguments": json_object(
                    arguments, f"{param}.tool_calls.{j}.function.arguments")}}
            for j, (call_id, call_name, arguments) in enumerate(tool_calls)]
    return message


def json_object(text: str, param: str) -> dict:
    """A JSON object sent as text (call arguments, a gRPC tool's schema): templates and
    grammars read the object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(param, f"not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise _invalid(param, "must be a JSON object")
    return value


async def decode(served: ServedModel, token_ids: list[int]) -> str:
    return await off_loop(lambda: served.tokenizer.decode(token_ids))


def check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if t >= served.info.vocab_size), None)
    if bad is not None:
        raise GatewayError(400, f"{param}: token id {bad} is outside the vocabulary (size "
                           f"{served.info.vocab_size})", "invalid_request_error", param)


def check_length(served: ServedModel, num_prompt: int, max_tokens: int | None,
                 param: str = "max_tokens", prompt_param: str = "prompt") -> None:
    """Prompt + max_tokens within the context (`param` and `prompt_param`: the fields as the
    client's API names them)."""
    limit = served.info.max_model_len
    if num_prompt == 0:
        raise GatewayError(400, f"{prompt_param}: the prompt is empty", "invalid_request_error",
                           prompt_param)
    requested = num_prompt + (max_tokens or 1)
    if requested > limit:
        raise GatewayError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
            f"requested {requested} tokens ({num_prompt} in the prompt, {max_tokens or 1} "
            f"for the completion). Please reduce the prompt or {param}.",
            "invalid_request_error", param if max_tokens else prompt_param)


def check_sampling_rules(served: ServedModel, sampling: common_pb2.SamplingParams,
                         param: Callable[[str], str]) -> None:
    """The request rules both APIs share (runtime/request_rules.py), against the limits the
    scheduler relayed for the model; a 400 naming the field as `param` spells it for the API.
    n is bounded by the executor's --max-num-seqs too, as admission bounds it (refused there,
    the error would name the scheduler's field, not the client's)."""
    try:
        check_sampling(sampling, SamplingLimits.for_executor(
            served.info.vocab_size, served.limits.max_logprobs, served.limits.max_num_seqs))
    except RuleError as exc:
        name = param(exc.field)
        raise GatewayError(400, f"{name}: {exc.rule}", "invalid_request_error", name) from None
