"""The OpenAI-compatible HTTP API (FastAPI): completions and chat completions (streamed as
server-sent events or not), embeddings, models, tokenize / detokenize, liveness and readiness.
Every error is answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve.gateway.errors import RETRY_AFTER_S, GatewayError, error_body
from pagedserve.gateway.generation import (
    ChoiceDelta,
    Usage,
    beam_choices,
    embed,
    generate,
    read_tool_calls,
)
from pagedserve.gateway.metrics import METRICS
from pagedserve.gateway.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ErrorResponse,
    SamplingFields,
    TokenizeRequest,
)
from pagedserve.gateway.policy import DEFAULT_POLICY, ClientPolicy
from pagedserve.gateway.prompts import (
    chat_prompt_ids,
    check_length,
    check_sampling_rules,
    check_token_ids,
    decode,
    text_prompt_ids,
)
from pagedserve.gateway.scheduler_client import (
    Deadline,
    SchedulerClient,
    ServedModel,
    parse_timeout,
)
from pagedserve.gateway.tool_calls import (
    NO_TOOLS,
    ToolCallDelta,
    ToolPlan,
    merge_calls,
    plan_tools,
)
from pagedserve.v1 import common_pb2

# Readiness: an executor that has work and returned nothing for this long is wedged.
STALL_S = 60.0
DISCONNECT_POLL_S = 0.05
# Larger request bodies are refused with 413 before they are read (Content-Length) or as soon
# as the streamed body passes it.
MAX_BODY_BYTES = 16 * 2**20
# Per-request timeout in seconds a client may send (OpenAI's API has no such body field); the
# tighter of it and --request-timeout applies.
TIMEOUT_HEADER = "X-Request-Timeout"
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}

_ERROR_MEANINGS = {
    400: "invalid request; `param` names the field",
    401: "missing or invalid API key (only with --api-key)",
    404: "the model is not served",
    413: f"the body is over {MAX_BODY_BYTES} bytes",
    429: "the scheduler's queue is full (--max-queue-len); retry after Retry-After seconds",
    503: "the scheduler or every executor is unavailable",
    504: "the request's timeout (--request-timeout, X-Request-Timeout) passed",
}


def documented_errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` for the error statuses a route answers, in OpenAI's shape."""
    return {s: {"model": ErrorResponse, "description": _ERROR_MEANINGS[s]} for s in statuses}


# Every route may answer these (unauthenticated, body too large).
_ANY_ROUTE = (401, 413)
_MODEL_ROUTE = (*_ANY_ROUTE, 400, 404, 503)
_GENERATION_RESPONSES = {
    200: {"description": "the completion, or with `stream: true` server-sent events",
          "content": {"text/event-stream": {}}},
    **documented_errors(*_MODEL_ROUTE, 429, 504)}

log = structlog.get_logger(__name__)


def error_response(status: int, message: str, error_type: str, param: str | None = None):
    return JSONResponse(status_code=status, content=error_body(status, message, error_type, param))


def _too_large() -> StarletteHTTPException:
    return StarletteHTTPException(413, f"the request body is over {MAX_BODY_BYTES} bytes")


class BodyLimit:
    """ASGI middleware: request bodies of at most MAX_BODY_BYTES."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            exc = _too_large()
            response = error_response(exc.status_code, exc.detail, "invalid_request_error")
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise _too_large()  # FastAPI re-raises HTTPExceptions from body reading
            return message

        await self.app(scope, limited, send)


def create_app(client: SchedulerClient, request_timeout_s: float | None = None,
               policy: ClientPolicy = DEFAULT_POLICY) -> FastAPI:
    """The HTTP API over `client`; `request_timeout_s` (--request-timeout) bounds every
    generation request, None: only a client's X-Request-Timeout does; `policy`: what clients
    may set (priority, cache salts). The table below routes to this module's handlers, which
    reach these through the app's state (`Scheduler`, `respond`)."""
    app = FastAPI(title="pagedserve", summary="OpenAI-compatible LLM serving")
    app.state.client = client
    app.state.request_timeout_s = request_timeout_s
    app.state.policy = policy
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(GatewayError, gateway_error)
    app.get("/health")(health)
    app.get("/ready", responses=documented_errors(503))(ready)
    app.get("/metrics", response_class=PlainTextResponse)(metrics)
    app.get("/v1/models", responses=documented_errors(*_ANY_ROUTE, 404, 503))(models)
    app.post("/tokenize", responses=documented_errors(*_MODEL_ROUTE))(tokenize)
    app.post("/detokenize", responses=documented_errors(*_MODEL_ROUTE))(detokenize)
    app.post("/v1/completions", responses=_GENERATION_RESPONSES)(completions)
    app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)(chat_completions)
    app.post("/v1/embeddings", responses=documented_errors(*_MODEL_ROUTE, 429, 504))(embeddings)
    return app


async def _scheduler(request: Request) -> SchedulerClient:
    # async: FastAPI runs a plain `def` dependency on a worker thread, which cost every request
    # a thread hop and grew the gateway by a thread per concurrent request (the soak saw it).
    return request.app.state.client


# A route's scheduler client, from the app it serves (create_app).
Scheduler = Annotated[SchedulerClient, Depends(_scheduler)]


async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":  # its location is a character offset, no field
        return error_response(400, f"the body is not valid JSON: {first['ctx']['error']}",
                              "invalid_request_error")
    # Without pydantic's union-member tags ("str", "list[int]", "function-after[...]").
    location = [str(part) for part in first["loc"] if part != "body"
                and str(part) not in _UNION_TAGS and not any(c in str(part) for c in "[-")]
    param = ".".join(location) or None
    message = "not supported by this server" if first["type"] == "extra_forbidden" \
        else first["msg"]
    return error_response(400, f"{param or 'body'}: {message}", "invalid_request_error", param)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Bodies FastAPI cannot parse (bad UTF-8, nesting too deep), too large, unknown paths.
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return error_response(exc.status_code, message, kind)


async def gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
    response = JSONResponse(status_code=exc.status, content=exc.body())
    if exc.status == 429:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def health() -> dict:
    """Liveness: the gateway process answers."""
    return {"status": "ok"}


async def ready(client: Scheduler):
    """Readiness: whether this gateway can serve, i.e. the scheduler answers and at least one
    executor makes progress. A wedged executor alone does not make it unready (the scheduler's
    step watchdog replaces it): taking every gateway out of its Service for one stuck GPU would
    turn it into an outage. The wedged ones are named in the answer."""
    try:
        stats = await client.stats(timeout=2.0)
    except GatewayError as exc:
        return error_response(503, exc.message, "service_unavailable")
    if not stats.executors:
        return error_response(503, "no executor is registered", "service_unavailable")
    stalled = [e.executor_id for e in stats.executors if e.seconds_since_progress > STALL_S]
    if len(stalled) == len(stats.executors):
        return error_response(503, f"no executor is progressing: {stalled}",
                              "service_unavailable")
    return {"status": "ready", "executors": len(stats.executors) - len(stalled),
            "stalled_executors": stalled}


async def metrics(client: Scheduler) -> Response:
    """Prometheus exposition: the gateway's metrics and the scheduler's state."""
    try:
        stats = await client.stats(timeout=2.0)
    except GatewayError:
        stats = None  # the gateway's own metrics are still worth scraping
    return Response(METRICS.exposition(stats), media_type=CONTENT_TYPE_LATEST)


async def models(client: Scheduler) -> dict:
    served = await client.model()
    return {"object": "list", "data": [{
        "id": served.info.model_id, "object": "model", "created": 0,
        "owned_by": "pagedserve", "max_model_len": served.info.max_model_len}]}


async def tokenize(body: TokenizeRequest, client: Scheduler) -> dict:
    served = await client.model(body.model or "")
    conversation = body.conversation()
    if conversation is not None:
        ids = await chat_prompt_ids(served, conversation.template_messages(), True,
                                    tools=conversation.template_tools())
    elif body.prompt is not None:
        ids = await text_prompt_ids(served, body.prompt, "prompt", body.add_special_tokens)
    else:
        raise GatewayError(400, "prompt or messages is required", "invalid_request_error",
                           "prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": served.info.max_model_len}


async def detokenize(body: DetokenizeRequest, client: Scheduler) -> dict:
    served = await client.model(body.model or "")
    check_token_ids(served, body.tokens, "tokens")
    return {"prompt": await decode(served, body.tokens)}


async def completions(body: CompletionRequest, request: Request, client: Scheduler):
    served = await client.model(body.model or "")
    prompts = [await text_prompt_ids(served, p, "prompt") if isinstance(p, str) else p
               for p in body.prompts()]
    for ids in prompts:
        check_token_ids(served, ids, "prompt")
        check_length(served, len(ids), body.max_tokens)
    sampling = body.sampling_params(body.max_tokens, body.logprobs, body.prompt_logprobs)
    if body.echo and body.logprobs is not None:
        # An echoed prompt comes with its tokens' logprobs (the first has none), OpenAI's way.
        sampling.prompt_logprobs = max(body.logprobs, body.prompt_logprobs or 0)
    return await respond(request, client, body, served,
                         CompletionFormat(served, body, prompts, [Usage() for _ in prompts]),
                         prompts, sampling)


async def chat_completions(body: ChatCompletionRequest, request: Request, client: Scheduler):
    served = await client.model(body.model or "")
    policy: ClientPolicy = request.app.state.policy
    tools = plan_tools(body.tool_list(), body.choice(), body.parallel_tool_calls,
                       policy.auto_tool_parser)
    ids = await chat_prompt_ids(served, body.template_messages(), body.add_generation_prompt,
                                tools=body.template_tools())
    check_length(served, len(ids), body.max_output_tokens(), body.param("max_tokens"))
    sampling = body.sampling_params(body.max_output_tokens(), body.logprobs_count(),
                                    body.prompt_logprobs)
    tools.adapt(sampling, served.tokenizer)
    return await respond(request, client, body, served, ChatFormat(served, body, [Usage()]),
                         [ids], sampling, tools)


async def embeddings(body: EmbeddingRequest, request: Request, client: Scheduler):
    """OpenAI's embeddings: each input's final hidden states pooled as the gateway's
    --pooler-config says; the inputs run through the scheduler together."""
    served = await client.model(body.model or "")
    prompts = [await text_prompt_ids(served, p, "input", body.add_special_tokens)
               if isinstance(p, str) else p for p in body.prompts()]
    for ids in prompts:
        check_token_ids(served, ids, "input")
        check_length(served, len(ids), None, prompt_param="input")
    request_id = f"embd-{uuid.uuid4().hex}"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    deadline = request_deadline(request, request.app.state.request_timeout_s)
    policy: ClientPolicy = request.app.state.policy
    cache_salt = policy.cache_salt("", request.headers.get("authorization"))

    async def every_input() -> list[list[float]]:
        tasks = [asyncio.ensure_future(embed(client, served, f"{request_id}-{i}", ids,
                                             policy.pooling, deadline, cache_salt))
                 for i, ids in enumerate(prompts)]
        try:
            return await asyncio.gather(*tasks)
        finally:  # one input refused (queue full, deadline): the others stop with it
            for task in tasks:
                task.cancel()

    vectors = await until_disconnected(request, every_input())
    if vectors is None:
        return client_gone()
    tokens = sum(map(len, prompts))
    return {"object": "list", "model": served.info.model_id,
            "data": [{"object": "embedding", "index": i,
                      "embedding": encoded(vector, body.encoding_format)}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's encodings: the floats, or base64 of their little-endian float32 bytes."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def respond(request: Request, client: SchedulerClient, body: SamplingFields,
                  served: ServedModel, fmt, prompts: list[list[int]],
                  sampling: common_pb2.SamplingParams, tools: ToolPlan = NO_TOOLS):
    """Checks the request's rules, runs the prompts' choices (their answers read for calls as
    `tools` says) and answers: a stream of server-sent events, or one JSON."""
    check_sampling_rules(served, sampling, lambda field: tools.param(field, body.param))
    body.check_prompt_logprobs()
    policy: ClientPolicy = request.app.state.policy
    priority = policy.priority(body.priority)
    cache_salt = policy.cache_salt(body.cache_salt or "", request.headers.get("authorization"))
    request_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
    structlog.contextvars.bind_contextvars(request_id=request_id)
    deadline = request_deadline(request, request.app.state.request_timeout_s)
    usages = fmt.usages  # one per prompt, filled in as the answers come
    n = max(1, sampling.n)

    beam_params = (body.beam_search_params(sampling.max_tokens or None,
                                           served.limits.max_logprobs)
                   if body.use_beam_search else None)

    async def deltas() -> AsyncIterator[ChoiceDelta]:
        # Several prompts: choices are numbered prompt by prompt (OpenAI's order).
        for p, ids in enumerate(prompts):
            if beam_params is not None:  # finished choices, at once
                for choice in await beam_choices(client, served, f"{request_id}-{p}", ids,
                                                 beam_params, usages[p], deadline, priority,
                                                 cache_salt):
                    choice.index += p * n
                    yield choice
                continue
            async for choice in read_tool_calls(
                    generate(client, served, f"{request_id}-{p}", ids, sampling, usages[p],
                             priority, deadline, cache_salt), tools):
                choice.index += p * n
                yield choice

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = await started(request, deltas())
        if stream is None:
            return client_gone()
        return StreamingResponse(sse(fmt, request_id, stream, usages, include_usage),
                                 media_type="text/event-stream")
    collected = await until_disconnected(request, collect(deltas()))
    if collected is None:
        return client_gone()
    return fmt.full_response(request_id, collected)


def request_deadline(request: Request, default_s: float | None) -> Deadline:
    """The tighter of the gateway's --request-timeout and the client's X-Request-Timeout."""
    raw = request.headers.get(TIMEOUT_HEADER)
    client_s = None if raw is None else parse_timeout(raw, TIMEOUT_HEADER)
    return Deadline.after(default_s, client_s)


def client_gone() -> JSONResponse:
    log.info("client disconnected; request aborted")
    return JSONResponse(status_code=499, content={})


_END = object()


async def started(request: Request, deltas: AsyncIterator[ChoiceDelta]
                  ) -> AsyncIterator[ChoiceDelta] | None:
    """`deltas` once its first delta is in, so that a refusal before any token (queue full,
    deadline, admission) is still answered with its HTTP status rather than inside a 200
    event stream; None (and the request aborted) if the client leaves first."""
    first = await until_disconnected(request, anext(deltas, _END))
    if first is None:
        return None

    async def resumed() -> AsyncIterator[ChoiceDelta]:
        if first is not _END:
            yield first
            async for delta in deltas:
                yield delta
    return resumed()


async def until_disconnected(request: Request, work):
    """The result of `work`, or None (with `work` cancelled) if the client goes away first:
    a non-streamed request must not run on for nobody."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return None
    return task.result()


async def collect(deltas: AsyncIterator[ChoiceDelta]) -> dict[int, ChoiceDelta]:
    choices: dict[int, ChoiceDelta] = {}
    async for delta in deltas:
        choice = choices.setdefault(delta.index, ChoiceDelta(delta.index, "", [], []))
        choice.text += delta.text
        choice.token_ids += delta.token_ids
        choice.logprobs += delta.logprobs
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        merge_calls(delta.tool_calls, choice.tool_calls)
    return choices


def prompt_logprobs_json(served: ServedModel, positions: list[common_pb2.PositionLogprobs],
                         num_top: int) -> list[dict | None]:
    """vLLM's shape: per prompt position, None for the first, else the prompt token's and the
    `num_top` top alternatives' {"logprob", "rank", "decoded_token"} by token id."""
    decode = served.tokenizer.decode

    def entry(token: common_pb2.TokenLogprob) -> tuple[str, dict]:
        return str(token.token_id), {"logprob": token.logprob, "rank": token.rank,
                                     "decoded_token": decode([token.token_id])}
    return [dict([entry(p.chosen), *map(entry, p.top[:num_top])]) if p.HasField("chosen")
            else None for p in positions]


def total_usage(usages: list[Usage]) -> dict:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in usages)}}


async def sse(fmt, request_id: str, deltas: AsyncIterator[ChoiceDelta], usages: list[Usage],
              include_usage: bool) -> AsyncIterator[str]:
    try:
        async for delta in deltas:
            yield f"data: {json.dumps(fmt.chunk(request_id, delta))}\n\n"
        if include_usage:
            yield f"data: {json.dumps(fmt.usage_chunk(request_id, total_usage(usages)))}\n\n"
    except GatewayError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    yield "data: [DONE]\n\n"


class CompletionFormat:
    id_prefix = "cmpl"

    def __init__(self, served: ServedModel, body: CompletionRequest, prompts: list[list[int]],
                 usages: list[Usage]):
        self.served, self.body, self.prompts, self.usages = served, body, prompts, usages
        self.created = int(time.time())
        self._started: set[int] = set()  # streamed choices that sent their first chunk

    def _prompt_of(self, choice: ChoiceDelta) -> int:
        return choice.index // max(1, self.body.n)

    def _logprobs(self, choice: ChoiceDelta, echo: bool) -> dict | None:
        if self.body.logprobs is None:
            return None
        decode = self.served.tokenizer.decode
        tokens = [decode([t]) for t in choice.token_ids]
        chosen: list[float | None] = [lp.chosen.logprob for lp in choice.logprobs]
        top: list[dict | None] = [{decode([t.token_id]): t.logprob for t in lp.top}
                                  for lp in choice.logprobs]
        if echo:  # the prompt's first: None where nothing predicts a token (the first)
            positions = self.usages[self._prompt_of(choice)].prompt_logprobs
            tokens = [decode([t]) for t in self.prompts[self._prompt_of(choice)]] + tokens
            chosen = [p.chosen.logprob if p.HasField("chosen") else None
                      for p in positions] + chosen
            top = [{decode([t.token_id]): t.logprob for t in p.top[:self.body.logprobs]}
                   if p.HasField("chosen") else None for p in positions] + top
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top,
                "text_offset": []}

    def _answer(self, choice: ChoiceDelta, first: bool) -> dict:
        """A choice's JSON; the echoed prompt goes with its first part."""
        echo = self.body.echo and first
        text = choice.text
        if echo:
            text = self.served.tokenizer.decode(self.prompts[self._prompt_of(choice)]) + text
        return {"index": choice.index, "text": text, "logprobs": self._logprobs(choice, echo),
                "finish_reason": choice.finish_reason}

    def full_response(self, request_id: str, choices: dict[int, ChoiceDelta]) -> dict:
        answers = []
        for _, choice in sorted(choices.items()):
            answers.append(self._answer(choice, first=True))
            if self.body.prompt_logprobs is not None:  # each choice carries its prompt's
                answers[-1]["prompt_logprobs"] = prompt_logprobs_json(
                    self.served, self.usages[self._prompt_of(choice)].prompt_logprobs,
                    self.body.prompt_logprobs)
        return {"id": request_id, "object": "text_completion", "created": self.created,
                "model": self.served.info.model_id, "choices": answers,
                "usage": total_usage(self.usages)}

    def chunk(self, request_id: str, delta: ChoiceDelta) -> dict:
        first = delta.index not in self._started
        self._started.add(delta.index)
        return {"id": request_id, "object": "text_completion", "created": self.created,
                "model": self.served.info.model_id, "choices": [self._answer(delta, first)]}

    def usage_chunk(self, request_id: str, usage: dict) -> dict:
        return {"id": request_id, "object": "text_completion", "created": self.created,
                "model": self.served.info.model_id, "choices": [], "usage": usage}


class ChatFormat:
    id_prefix = "chatcmpl"

    def __init__(self, served: ServedModel, body: ChatCompletionRequest, usages: list[Usage]):
        self.served, self.body, self.usages = served, body, usages
        self.created = int(time.time())
        self._started: set[int] = set()

    def _logprobs(self, choice: ChoiceDelta) -> dict | None:
        if not choice.logprobs:
            return None
        decode = self.served.tokenizer.decode

        def entry(token_id: int, logprob: float) -> dict:
            text = decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.chosen.token_id, lp.chosen.logprob),
                             "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
                            for lp in choice.logprobs]}

    def full_response(self, request_id: str, choices: dict[int, ChoiceDelta]) -> dict:
        usages = self.usages
        response = {"id": request_id, "object": "chat.completion", "created": self.created,
                    "model": self.served.info.model_id,
                    "choices": [{"index": i, "message": self._message(c),
                                 "logprobs": self._logprobs(c),
                                 "finish_reason": c.finish_reason}
                                for i, c in sorted(choices.items())],
                    "usage": total_usage(usages)}
        if self.body.prompt_logprobs is not None:  # vLLM's place for them: the response's
            response["prompt_logprobs"] = prompt_logprobs_json(
                self.served, usages[0].prompt_logprobs, self.body.prompt_logprobs)
        return response

    @staticmethod
    def _message(choice: ChoiceDelta) -> dict:
        """A whole answer; with calls, content is what came before them (None if blank)."""
        if not choice.tool_calls:
            return {"role": "assistant", "content": choice.text}
        return {"role": "assistant", "content": choice.text if choice.text.strip() else None,
                "tool_calls": [{"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
                               for call in choice.tool_calls]}

    def chunk(self, request_id: str, delta: ChoiceDelta) -> dict:
        message: dict = {"content": delta.text}
        if delta.tool_calls:  # OpenAI's: the call's id, type and name in its first delta
            message = {"content": delta.text or None,
                       "tool_calls": [call_chunk(call) for call in delta.tool_calls]}
        if delta.index not in self._started:  # the first chunk of a choice names the role
            self._started.add(delta.index)
            message = {"role": "assistant", **message}
        return {"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.info.model_id,
                "choices": [{"index": delta.index, "delta": message,
                             "logprobs": self._logprobs(delta),
                             "finish_reason": delta.finish_reason}]}

    def usage_chunk(self, request_id: str, usage: dict) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.info.model_id, "choices": [], "usage": usage}


def call_chunk(call: ToolCallDelta) -> dict:
    if call.id is None:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    return {"index": call.index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
