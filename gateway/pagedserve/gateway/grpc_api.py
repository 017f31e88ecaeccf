"""The public gRPC API (pagedserve.v1.Generation), with the semantics of the HTTP API: the same
prompt handling, request rules, client policy, detokenization and stop strings
(pagedserve.gateway.generation). Cancelling a Generate call aborts the request on the scheduler.

A client's `request_id` is a label, echoed back and logged: the scheduler-side id is always the
gateway's own, so two clients sending the same id never share a request."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from pagedserve.gateway.errors import RETRY_AFTER_S, GatewayError
from pagedserve.gateway.generation import Usage, generate, read_tool_calls
from pagedserve.gateway.policy import DEFAULT_POLICY, ClientPolicy
from pagedserve.gateway.prompts import (
    chat_prompt_ids,
    check_length,
    check_sampling_rules,
    check_token_ids,
    decode,
    json_object,
    template_message,
    text_prompt_ids,
)
from pagedserve.gateway.scheduler_client import Deadline, SchedulerClient, ServedModel
from pagedserve.gateway.tool_calls import (
    Tool,
    ToolChoice,
    plan_tools,
)
from pagedserve.runtime.finish_reasons import from_openai_name
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED}

log = structlog.get_logger(__name__)

# Longest client request_id echoed back (it is repeated in every response message).
MAX_CLIENT_ID_CHARS = 256


async def abort(context: grpc.aio.ServicerContext, exc: GatewayError) -> None:
    """Ends the call with the gRPC twin of the error's HTTP status; an overload refusal also
    carries `retry-after` (seconds) in its trailing metadata, as HTTP's Retry-After."""
    code = _CODES.get(exc.status, grpc.StatusCode.INTERNAL)
    trailers = (("retry-after", str(RETRY_AFTER_S)),) \
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED else ()
    await context.abort(code, exc.message, trailing_metadata=trailers)


def sampling_param(field: str) -> str:
    """A SamplingParams field as a Generate request names it."""
    return f"sampling.{field}"


def client_label(request_id: str) -> str:
    if len(request_id) > MAX_CLIENT_ID_CHARS:
        raise GatewayError(400, f"request_id: at most {MAX_CLIENT_ID_CHARS} characters",
                           "invalid_request_error", "request_id")
    return request_id


def chat_messages(chat: generation_pb2.ChatPrompt) -> list[dict]:
    """The chat's messages for the template: at least one, each following its role's rules
    (those of the HTTP API's messages)."""
    if not chat.messages:
        raise GatewayError(400, "chat.messages: empty", "invalid_request_error",
                           "chat.messages")
    return [template_message(m.role, m.content, f"chat.messages.{i}", name=m.name,
                             tool_calls=[(c.id, c.name, c.arguments) for c in m.tool_calls],
                             tool_call_id=m.tool_call_id)
            for i, m in enumerate(chat.messages)]


_MODES = {generation_pb2.ToolChoice.MODE_NONE: "none",
          generation_pb2.ToolChoice.MODE_AUTO: "auto",
          generation_pb2.ToolChoice.MODE_REQUIRED: "required"}


def chat_tools(chat: generation_pb2.ChatPrompt) -> tuple[list[Tool], ToolChoice | None]:
    tools = [Tool(t.name, t.description or None,
                  json_object(t.parameters, f"chat.tools.{i}.parameters") if t.parameters
                  else None) for i, t in enumerate(chat.tools)]
    which = chat.tool_choice.WhichOneof("choice")
    if which == "function":
        return tools, ToolChoice("named", chat.tool_choice.function)
    mode = _MODES.get(chat.tool_choice.mode) if which == "mode" else None
    return tools, ToolChoice(mode) if mode else None


async def chat_ids(served: ServedModel, chat: generation_pb2.ChatPrompt,
                   add_generation_prompt: bool, tools: list[Tool]) -> list[int]:
    """The chat prompt's token ids, its tools rendered by the template."""
    return await chat_prompt_ids(served, chat_messages(chat), add_generation_prompt,
                                 "chat.messages", [t.template_json() for t in tools] or None)


class GenerationService(generation_pb2_grpc.GenerationServicer):
    """`request_timeout_s` (--request-timeout) bounds calls whose deadline is later or unset."""

    def __init__(self, client: SchedulerClient, policy: ClientPolicy = DEFAULT_POLICY,
                 request_timeout_s: float | None = None):
        self.client = client
        self.policy = policy
        self.request_timeout_s = request_timeout_s

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = f"gen-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(request_id=request_id)
        # The tighter of the client's call deadline and the gateway's --request-timeout travels
        # on to the scheduler, which aborts the request when it passes.
        deadline = Deadline.after(context.time_remaining(), self.request_timeout_s)
        try:
            label = client_label(request.request_id) or request_id
            if request.request_id:
                structlog.contextvars.bind_contextvars(client_request_id=label)
            priority = self.policy.priority(request.priority)
            cache_salt = self.policy.cache_salt(
                request.cache_salt, dict(context.invocation_metadata()).get("authorization"))
            served = await self.client.model(request.model)
            tool_list, choice = chat_tools(request.chat) \
                if request.WhichOneof("prompt") == "chat" else ([], None)
            parallel = request.chat.parallel_tool_calls \
                if request.chat.HasField("parallel_tool_calls") else True
            tools = plan_tools(tool_list, choice, parallel, self.policy.auto_tool_parser,
                               "chat.tools")
            prompt_ids = await self._prompt_ids(served, request, tool_list)
            check_token_ids(served, prompt_ids, "token_ids")
            sampling = request.sampling
            check_length(served, len(prompt_ids),
                         sampling.max_tokens if sampling.HasField("max_tokens") else None,
                         sampling_param("max_tokens"))
            tools.adapt(sampling, served.tokenizer, "chat.tool_choice")
            check_sampling_rules(served, sampling,
                                 lambda field: tools.param(field, sampling_param))
            usage = Usage()
            first = True
            async for choice in read_tool_calls(
                    generate(self.client, served, request_id, prompt_ids, sampling, usage,
                             priority, deadline, cache_salt), tools):
                reply = generation_pb2.GenerateResponse(request_id=label)
                if first:
                    first = False
                    reply.prompt_logprobs.extend(usage.prompt_logprobs)
                    reply.embedding.extend(usage.embedding)
                    if request.echo:
                        reply.prompt_token_ids.extend(prompt_ids)
                        reply.prompt_text = await decode(served, prompt_ids)
                reply.choices.add(index=choice.index, text=choice.text,
                                  token_ids=choice.token_ids, logprobs=choice.logprobs,
                                  finish_reason=from_openai_name(choice.finish_reason),
                                  stop_reason="" if choice.stop_reason is None
                                  else str(choice.stop_reason),
                                  tool_calls=[generation_pb2.ToolCallDelta(
                                      index=call.index, id=call.id or "",
                                      name=call.name or "", arguments=call.arguments)
                                      for call in choice.tool_calls])
                yield reply
            yield generation_pb2.GenerateResponse(request_id=label, usage=common_pb2.Usage(
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_prompt_tokens=usage.cached_tokens))
        except GatewayError as exc:
            await abort(context, exc)

    @staticmethod
    async def _prompt_ids(served: ServedModel, request: generation_pb2.GenerateRequest,
                          tools: list[Tool]) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            return await text_prompt_ids(served, request.text, "text")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "chat":
            add = request.chat.add_generation_prompt \
                if request.chat.HasField("add_generation_prompt") else True
            return await chat_ids(served, request.chat, add, tools)
        raise GatewayError(400, "prompt: set one of text, token_ids or chat",
                           "invalid_request_error", "prompt")

    async def Tokenize(self, request, context) -> generation_pb2.TokenizeResponse:
        try:
            served = await self.client.model(request.model)
            if request.WhichOneof("prompt") == "chat":
                ids = await chat_ids(served, request.chat, True, chat_tools(request.chat)[0])
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") \
                    else True
                ids = await text_prompt_ids(served, request.text, "text", add)
        except GatewayError as exc:
            await abort(context, exc)
        return generation_pb2.TokenizeResponse(token_ids=ids,
                                               max_model_len=served.info.max_model_len)

    async def Detokenize(self, request, context) -> generation_pb2.DetokenizeResponse:
        try:
            served = await self.client.model(request.model)
            check_token_ids(served, list(request.token_ids), "token_ids")
        except GatewayError as exc:
            await abort(context, exc)
        return generation_pb2.DetokenizeResponse(
            text=await decode(served, list(request.token_ids)))

    async def ListModels(self, request, context) -> generation_pb2.ListModelsResponse:
        try:
            served = await self.client.model()
        except GatewayError as exc:
            await abort(context, exc)
        return generation_pb2.ListModelsResponse(models=[served.info])
