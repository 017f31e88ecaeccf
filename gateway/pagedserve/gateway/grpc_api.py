"""The public gRPC API (pagedserve.v1.Generation), with the semantics of the HTTP API: the same
prompt handling, checks, detokenization and stop strings (pagedserve.gateway.generation). Cancelling
a Generate call aborts the request on the scheduler."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from pagedserve.gateway.errors import RETRY_AFTER_S, GatewayError
from pagedserve.gateway.generation import Usage, generate
from pagedserve.gateway.openai_protocol import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
)
from pagedserve.gateway.prompts import chat_prompt_ids, check_length, check_token_ids
from pagedserve.gateway.scheduler_client import Deadline, SchedulerClient
from pagedserve.runtime.finish_reasons import from_openai_name
from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
          504: grpc.StatusCode.DEADLINE_EXCEEDED}

log = structlog.get_logger(__name__)


async def abort(context: grpc.aio.ServicerContext, exc: GatewayError) -> None:
    """Ends the call with the gRPC twin of the error's HTTP status; an overload refusal also
    carries `retry-after` (seconds) in its trailing metadata, as HTTP's Retry-After."""
    code = _CODES.get(exc.status, grpc.StatusCode.INTERNAL)
    trailers = (("retry-after", str(RETRY_AFTER_S)),) \
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED else ()
    await context.abort(code, exc.message, trailing_metadata=trailers)


def check_sampling(params: common_pb2.SamplingParams) -> None:
    """The checks the HTTP API's request model applies, for the fields gRPC clients set."""
    problems = [
        ("sampling.temperature", params.HasField("temperature") and params.temperature < 0,
         "must be >= 0"),
        ("sampling.top_p", params.HasField("top_p") and not 0 < params.top_p <= 1,
         "must be in (0, 1]"),
        ("sampling.top_k", params.top_k < -1, "must be >= -1"),
        ("sampling.min_p", not 0 <= params.min_p <= 1, "must be in [0, 1]"),
        ("sampling.n", params.n > MAX_N, f"must be <= {MAX_N}"),
        ("sampling.logprobs", params.HasField("logprobs") and params.logprobs > MAX_LOGPROBS,
         f"must be <= {MAX_LOGPROBS}"),
        ("sampling.max_tokens", params.HasField("max_tokens") and params.max_tokens == 0,
         "must be >= 1"),
        ("sampling.repetition_penalty",
         params.HasField("repetition_penalty") and params.repetition_penalty <= 0, "must be > 0"),
        ("sampling.stop", len(params.stop) > MAX_STOP_STRINGS
         or any(not 0 < len(s) <= MAX_STOP_STRING_CHARS for s in params.stop),
         f"at most {MAX_STOP_STRINGS} stop strings of 1 to {MAX_STOP_STRING_CHARS} characters"),
        ("sampling.logit_bias", len(params.logit_bias) > MAX_LOGIT_BIAS
         or any(not -100 <= v <= 100 for v in params.logit_bias.values()),
         f"at most {MAX_LOGIT_BIAS} entries, each in [-100, 100]"),
    ]
    for field, bad, rule in problems:
        if bad:
            raise GatewayError(400, f"{field}: {rule}", "invalid_request_error", field)


def chat_messages(chat: generation_pb2.ChatPrompt) -> list[dict]:
    """The chat's messages for the template: at least one, each of a known role (the HTTP
    API's ChatMessage rules)."""
    if not chat.messages:
        raise GatewayError(400, "chat.messages: empty", "invalid_request_error",
                           "chat.messages")
    bad = [m.role for m in chat.messages if m.role not in ("system", "user", "assistant")]
    if bad:
        raise GatewayError(400, f"chat.messages: unknown role {bad[0]!r}",
                           "invalid_request_error", "chat.messages")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, client: SchedulerClient):
        self.client = client

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(request_id=request_id)
        # The client's call deadline travels on to the scheduler, which aborts the request.
        deadline = Deadline.after(context.time_remaining())
        try:
            served = await self.client.model(request.model)
            prompt_ids = self._prompt_ids(served, request)
            check_token_ids(served, prompt_ids, "token_ids")
            sampling = request.sampling
            check_sampling(sampling)
            check_token_ids(served, list(sampling.logit_bias), "sampling.logit_bias")
            check_token_ids(served, list(sampling.stop_token_ids), "sampling.stop_token_ids")
            check_length(served, len(prompt_ids),
                         sampling.max_tokens if sampling.HasField("max_tokens") else None)
            usage = Usage()
            first = True
            async for choice in generate(self.client, served, request_id, prompt_ids, sampling,
                                         usage, request.priority, deadline):
                reply = generation_pb2.GenerateResponse(request_id=request_id)
                if first:
                    first = False
                    reply.prompt_logprobs.extend(usage.prompt_logprobs)
                    if request.echo:
                        reply.prompt_token_ids.extend(prompt_ids)
                        reply.prompt_text = served.tokenizer.decode(prompt_ids)
                reply.choices.add(index=choice.index, text=choice.text,
                                  token_ids=choice.token_ids, logprobs=choice.logprobs,
                                  finish_reason=from_openai_name(choice.finish_reason),
                                  stop_reason="" if choice.stop_reason is None
                                  else str(choice.stop_reason))
                yield reply
            yield generation_pb2.GenerateResponse(request_id=request_id, usage=common_pb2.Usage(
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_prompt_tokens=usage.cached_tokens))
        except GatewayError as exc:
            await abort(context, exc)

    @staticmethod
    def _prompt_ids(served, request) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            return served.tokenizer(request.text).input_ids
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "chat":
            add = request.chat.add_generation_prompt \
                if request.chat.HasField("add_generation_prompt") else True
            return chat_prompt_ids(served, chat_messages(request.chat), add)
        raise GatewayError(400, "prompt: set one of text, token_ids or chat",
                           "invalid_request_error", "prompt")

    async def Tokenize(self, request, context) -> generation_pb2.TokenizeResponse:
        try:
            served = await self.client.model(request.model)
            if request.WhichOneof("prompt") == "chat":
                ids = chat_prompt_ids(served, chat_messages(request.chat), True)
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") \
                    else True
                ids = served.tokenizer(request.text, add_special_tokens=add).input_ids
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
            text=served.tokenizer.decode(list(request.token_ids)))

    async def ListModels(self, request, context) -> generation_pb2.ListModelsResponse:
        try:
            served = await self.client.model()
        except GatewayError as exc:
            await abort(context, exc)
        return generation_pb2.ListModelsResponse(models=[served.info])
