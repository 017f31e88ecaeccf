"""OpenAI-compatible request bodies, validated field by field, and their translation into the
contract's SamplingParams. Pydantic checks each field's shape and type, and that its value fits
the contract's field (a uint32 cannot hold -1); the ranges and limits are the request rules
both APIs share (runtime/request_rules.py, applied in prompts.check_sampling_rules).

Every model refuses fields it does not define (`extra="forbid"`): a field the server does not
honour (`best_of`, `functions`, ...) is a 400 naming it, never silently ignored, so a client that
asked for something cannot take something else for it.

Structured output comes as OpenAI's `response_format` or vLLM's `structured_outputs`, at most
one of them and one kind; both become the contract's `StructuredOutput`, whose grammar the
request rules check (pagedserve/runtime/grammars.py)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.prompts import CHAT_ROLES, template_message
from pagedserve.gateway.tool_calls import FUNCTION_NAME, Tool, ToolChoice
from pagedserve.runtime.beam_search import BeamSearchParams
from pagedserve.runtime.request_rules import MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS
from pagedserve.v1 import common_pb2

# What the contract's fields can hold: larger values are refused as the wrong type, before any
# rule (and before protobuf would raise on them).
UInt32 = Annotated[int, Field(ge=0, lt=2**32, strict=True)]
TokenId = UInt32
Int32 = Annotated[int, Field(ge=-2**31, lt=2**31, strict=True)]


# JSON's true is not a number and 1 is not a boolean (the OpenAPI schema says so; the fuzzing
# test holds the gateway to it); an integer is still a valid float.
StrictBool = Annotated[bool, Field(strict=True)]


class Forbidding(BaseModel):
    """Unknown fields are refused by name (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Forbidding):
    include_usage: StrictBool = False


class JsonSchemaFormat(Forbidding):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    # `schema` would shadow pydantic's BaseModel.schema.
    json_schema: dict | None = Field(default=None, alias="schema")
    # Answers always follow the schema here; `strict` changes nothing.
    strict: StrictBool | None = None


class ResponseFormat(Forbidding):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Forbidding):
    """vLLM's structured_outputs: exactly one kind."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    # `json` would shadow pydantic's BaseModel.json.
    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None

    def spec(self) -> common_pb2.StructuredOutput:
        kinds = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise GatewayError(400, "structured_outputs: set exactly one of json, regex, "
                               "choice, grammar, json_object", "invalid_request_error",
                               "structured_outputs")
        kind = kinds[0]
        if kind == "json_":
            schema = self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)
            return common_pb2.StructuredOutput(json_schema=schema)
        if kind == "choice":
            return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=self.choice))
        return common_pb2.StructuredOutput(**{kind: getattr(self, kind)})


class SamplingFields(Forbidding):
    """Fields completions and chat share (vLLM's extensions included)."""

    model: str | None = None
    max_tokens: UInt32 | None = None
    temperature: Annotated[float, Field(strict=True)] | None = None
    top_p: Annotated[float, Field(strict=True)] | None = None
    top_k: Int32 | None = None
    min_p: Annotated[float, Field(strict=True)] | None = None
    presence_penalty: Annotated[float, Field(strict=True)] | None = None
    frequency_penalty: Annotated[float, Field(strict=True)] | None = None
    repetition_penalty: Annotated[float, Field(strict=True)] | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True)]] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64, strict=True)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: Annotated[int, Field(ge=1, lt=2**32, strict=True)] = 1
    ignore_eos: StrictBool = False
    min_tokens: UInt32 = 0
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # vLLM's beam search extension: the n best beams (n at most MAX_LOGPROBS / 2), scored by
    # cumulative logprob / length ** length_penalty.
    use_beam_search: StrictBool = False
    length_penalty: Annotated[float, Field(ge=-10.0, le=10.0, strict=True)] = 1.0
    # vLLM's: lower runs first (the gateway's ClientPolicy decides whether a client may set it).
    priority: Int32 = 0
    # Speculative decoding off for this request (the name of vLLM's proposed field).
    disable_spec_decode: StrictBool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: the logprob of each prompt token after the first, with this many alternatives
    # (non-streamed answers).
    prompt_logprobs: UInt32 | None = None
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt.
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, bias):
        """Keys are decimal token ids (ASCII digits: "²" is a digit to str.isdigit, not to
        int()); their count is checked first, so a huge map is not walked."""
        if bias is None:
            return bias
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key in bias:
            if not (key.isascii() and key.isdigit() and int(key) < 2**32):
                raise ValueError(f"keys must be token ids, got {key[:32]!r}")
        return bias

    def param(self, field: str) -> str:
        """The body field that sets SamplingParams field `field` (request_rules names these)."""
        if field.startswith("structured_output"):
            return self._structured_output_field()
        return field

    def _structured_output_field(self) -> str:
        if self.structured_outputs is not None:
            return "structured_outputs"
        if self.response_format and self.response_format.type == "json_schema":
            return "response_format.json_schema.schema"
        return "response_format"

    def check_prompt_logprobs(self) -> None:
        """prompt_logprobs come with the whole answer, not streamed."""
        if self.prompt_logprobs is not None and self.stream:
            raise GatewayError(400, "prompt_logprobs: not supported with stream",
                               "invalid_request_error", "prompt_logprobs")

    def structured_output(self) -> common_pb2.StructuredOutput | None:
        """The contract's spec of response_format or structured_outputs (a 400 naming the
        field when both are set, or a json_schema format lacks its schema)."""
        fmt = self.response_format
        wants_format = fmt is not None and fmt.type != "text"
        if wants_format and self.structured_outputs is not None:
            raise GatewayError(400, "structured_outputs: not with response_format (set one)",
                               "invalid_request_error", "structured_outputs")
        if self.structured_outputs is not None:
            return self.structured_outputs.spec()
        if not wants_format:
            return None
        if fmt.type == "json_object":
            return common_pb2.StructuredOutput(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise GatewayError(400, "response_format.json_schema.schema: required with type "
                               "json_schema", "invalid_request_error",
                               "response_format.json_schema.schema")
        return common_pb2.StructuredOutput(json_schema=json.dumps(fmt.json_schema.json_schema))

    def beam_search_params(self, max_tokens: int | None, max_logprobs: int) -> BeamSearchParams:
        """With use_beam_search: its parameters; a 400 naming a field it cannot honour (the
        search is greedy over the top logprobs, and not streamed)."""
        if not max_tokens:
            raise GatewayError(400, "use_beam_search: needs max_tokens (or "
                               "max_completion_tokens), the length of the beams",
                               "invalid_request_error", "use_beam_search")
        fields = type(self).model_fields
        refused = {name for name in BEAM_SEARCH_REFUSES & fields.keys()
                   if getattr(self, name) != fields[name].default}
        if self.temperature:  # unset or 0 is what the search does
            refused.add("temperature")
        if refused:
            name = min(refused)
            raise GatewayError(400, f"{name}: not supported with use_beam_search",
                               "invalid_request_error", name)
        params = BeamSearchParams(beam_width=self.n, max_tokens=max_tokens,
                                  ignore_eos=self.ignore_eos, length_penalty=self.length_penalty)
        try:
            params.check(max_logprobs)
        except ValueError as error:  # named by the HTTP fields: beam_width is n
            field, _, reason = str(error).partition(": ")
            field = {"beam_width": "n"}.get(field, field)
            raise GatewayError(400, f"{field}: {reason}", "invalid_request_error",
                               field) from None
        return params

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams(
            min_tokens=self.min_tokens, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            stop=self.stop_strings(), stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, n=self.n, disable_spec_decode=self.disable_spec_decode,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens)
        for name, value in (("max_tokens", max_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p), ("repetition_penalty", self.repetition_penalty),
                            ("seed", self.seed), ("logprobs", logprobs),
                            ("prompt_logprobs", prompt_logprobs)):
            if value is not None:
                setattr(params, name, value)
        spec = self.structured_output()
        if spec is not None:
            params.structured_output.CopyFrom(spec)
        return params


# Fields that change sampling or the answer's shape, which beam search does not honour (set to
# anything but their default; temperature, refused unless 0, is checked on its own).
BEAM_SEARCH_REFUSES = frozenset({
    "stream", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "min_tokens",
    "logprobs", "top_logprobs", "echo", "response_format", "structured_outputs",
    "prompt_logprobs", "tools"})


Prompts = str | list[str] | list[TokenId] | list[list[TokenId]]


def _non_empty(prompt: Prompts) -> Prompts:
    if isinstance(prompt, list) and not prompt:
        raise ValueError("the prompt list is empty")
    if isinstance(prompt, list) and isinstance(prompt[0], list) and not all(prompt):
        raise ValueError("a token-id prompt is empty")
    return prompt


def prompt_list(prompt: Prompts) -> list[str | list[int]]:
    """One entry per prompt: text or token ids."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class CompletionRequest(SamplingFields):
    prompt: Prompts
    # OpenAI's default for completions.
    max_tokens: UInt32 | None = 16
    logprobs: UInt32 | None = None
    echo: StrictBool = False

    _prompt_not_empty = field_validator("prompt")(_non_empty)

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.prompt)


class EmbeddingRequest(Forbidding):
    """OpenAI's embeddings request (`dimensions` is refused by name: the model's whole vector
    is returned)."""

    model: str | None = None
    input: Prompts
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    # vLLM's: add the tokenizer's special tokens (e.g. BOS) to text inputs.
    add_special_tokens: StrictBool = True

    _input_not_empty = field_validator("input")(_non_empty)

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.input)


class TextPart(Forbidding):
    """A part of a message's content: text (no other kind is served)."""

    type: Literal["text"]
    text: str


class FunctionCall(Forbidding):
    name: str
    # JSON text, as the model wrote it (OpenAI's shape).
    arguments: str


class MessageToolCall(Forbidding):
    """A call an assistant message made, as a client sends the conversation back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Forbidding):
    """One turn; its role's rules are checked with the gRPC API's (prompts.template_message):
    a tool turn answers a call (`tool_call_id`), an assistant turn may carry the calls it made
    and then needs no content."""

    role: Literal[CHAT_ROLES]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def template_message(self, param: str) -> dict:
        """The message as chat templates read it (`param`: this message's place)."""
        text = self.content if not isinstance(self.content, list) \
            else "\n".join(part.text for part in self.content)
        calls = [(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or []]
        return template_message(self.role, text, param, name=self.name, tool_calls=calls,
                                tool_call_id=self.tool_call_id)


# OpenAI's rule for function names.
FunctionName = Annotated[str, Field(pattern=f"^{FUNCTION_NAME.pattern}$")]


class FunctionDefinition(Forbidding):
    name: FunctionName
    description: str | None = None
    # The arguments' JSON schema.
    parameters: dict | None = None
    # Calls always follow the schema when the answer is constrained (`required`, a named
    # function); `strict` changes nothing.
    strict: StrictBool | None = None


class ToolDefinition(Forbidding):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Forbidding):
    name: FunctionName


class NamedToolChoice(Forbidding):
    type: Literal["function"]
    function: NamedFunction


class Conversation(Forbidding):
    """A chat and the tools its template renders (chat completions and /tokenize)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolDefinition] | None = None

    def template_messages(self) -> list[dict]:
        return [m.template_message(f"messages.{i}") for i, m in enumerate(self.messages)]

    def tool_list(self) -> list[Tool]:
        return [Tool(t.function.name, t.function.description, t.function.parameters)
                for t in self.tools or []]

    def template_tools(self) -> list[dict] | None:
        return [tool.template_json() for tool in self.tool_list()] if self.tools else None


class ChatCompletionRequest(Conversation, SamplingFields):
    max_completion_tokens: UInt32 | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # False: at most one call per answer (where the answer is constrained; a parser reads
    # whatever the model wrote).
    parallel_tool_calls: StrictBool = True
    logprobs: StrictBool = False
    top_logprobs: UInt32 | None = None
    add_generation_prompt: StrictBool = True

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top_logprobs, info):
        """The count of alternatives `logprobs: true` returns (OpenAI's rule; vLLM's too, which
        lets 0 pass): without it, a count would be ignored, and never checked."""
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top_logprobs

    def param(self, field: str) -> str:
        if field == "logprobs":
            return "top_logprobs"
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return super().param(field)

    def max_output_tokens(self) -> int | None:
        return self.max_tokens if self.max_completion_tokens is None \
            else self.max_completion_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def choice(self) -> ToolChoice | None:
        if self.tool_choice is None:
            return None
        if isinstance(self.tool_choice, str):
            return ToolChoice(self.tool_choice)
        return ToolChoice("named", self.tool_choice.function.name)


class TokenizeRequest(Forbidding):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    tools: list[ToolDefinition] | None = None
    add_special_tokens: StrictBool = True

    def conversation(self) -> Conversation | None:
        return None if self.messages is None \
            else Conversation(messages=self.messages, tools=self.tools)


class DetokenizeRequest(Forbidding):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, strict=True)]]


class ErrorDetail(BaseModel):
    message: str
    type: str
    # The request field (or header) at fault, when there is one.
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI's error shape, which every refusal of the HTTP API uses (documented in the
    OpenAPI spec so that clients and the schema fuzzer know every status it may answer)."""

    error: ErrorDetail
