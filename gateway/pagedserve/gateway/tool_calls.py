"""Tool calling in chat (OpenAI's `tools` and `tool_choice`), shared by the HTTP and gRPC APIs.

A request's tools are rendered into the prompt by the model's chat template; what the model
answers is read back here into OpenAI's `tool_calls`. How depends on `tool_choice`
(docs/tool_calling.md):

- `none`: the tools are in the prompt (so a conversation that used them renders as it did), the
  answer is plain content.
- `auto`: the model decides. Its answer is read with the gateway's `--tool-call-parser`, the
  format the model was trained to write: `hermes` (`<tool_call>{...}</tool_call>`, Hermes and
  Qwen), `llama3_json` (a JSON object, optionally after `<|python_tag|>`, at the start of the
  answer), `mistral` (`[TOOL_CALLS][{...}, ...]`). Text before the first call is content.
- `required` and a named function: the answer is constrained by structured output to JSON
  that holds the calls (a list of {"name", "parameters"}, or the named function's arguments),
  so arguments always parse and names are always the request's tools.

The reader works on text deltas, as they stream: content streams until a call's marker appears
(text that could begin a marker is held back until it cannot), then each call's name is sent
once known and its arguments as the raw JSON text the model writes, fragment by fragment. A
non-streamed answer is the same deltas merged, so streamed and whole answers agree. Arguments
are the model's text: as OpenAI says of its own, they may not be valid JSON when the choice is
`auto` (a call cut by max_tokens, a model that wrote bad JSON); with `required` or a named
function the grammar makes them valid.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pagedserve.gateway.errors import GatewayError
from pagedserve.v1 import common_pb2

ChoiceMode = Literal["none", "auto", "required", "named"]
# OpenAI's rule for function names (whole names: fullmatch).
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Parameters of a function that declares none: an object with any members.
ANY_PARAMETERS = {"type": "object"}


def new_call_id() -> str:
    """A call's id, OpenAI's shape."""
    return f"call_{secrets.token_hex(12)}"


def bad_request(param: str, reason: str) -> GatewayError:
    return GatewayError(400, f"{param}: {reason}", "invalid_request_error", param)


@dataclass(frozen=True)
class Tool:
    """One function the model may call."""

    name: str
    description: str | None = None
    # Its arguments' JSON schema; None: any object.
    parameters: dict | None = None

    def template_json(self) -> dict:
        """The tool as chat templates read it (OpenAI's shape)."""
        function = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode
    # The function to call, with mode "named".
    name: str = ""


@dataclass
class ToolCallDelta:
    """New output of one call: its id and name in its first delta, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class CallSyntax:
    """How a model writes calls: a marker opens the calls, which are the JSON objects after it,
    each with a "name" and one of `argument_keys` (text outside the objects is dropped)."""

    markers: tuple[str, ...]
    # True: calls only at the start of the answer (after whitespace); else anywhere.
    at_start: bool = False
    argument_keys: tuple[str, ...] = ("arguments",)
    # Mistral's templates accept 9 alphanumerics only.
    id_length: int | None = None

    def new_id(self) -> str:
        if self.id_length is None:
            return new_call_id()
        return "".join(secrets.choice(string.ascii_letters + string.digits)
                       for _ in range(self.id_length))


# --tool-call-parser names (vLLM's) and the syntax each reads.
PARSERS = {
    "hermes": CallSyntax(markers=("<tool_call>",)),
    "llama3_json": CallSyntax(markers=("<|python_tag|>", "{"), at_start=True,
                              argument_keys=("parameters", "arguments")),
    "mistral": CallSyntax(markers=("[TOOL_CALLS]",), id_length=9),
}
# What `required` constrains the answer to (constrained_output): a list of calls.
REQUIRED_SYNTAX = CallSyntax(markers=("[",), at_start=True, argument_keys=("parameters",))


def check_tools(tools: list[Tool], choice: ToolChoice | None, param: str = "tools") -> None:
    """Names unique; a choice that names a function names one of them; `param` names the
    request's list (`tool_choice` sits beside it)."""
    names = [tool.name for tool in tools]
    bad = next((i for i, name in enumerate(names) if not FUNCTION_NAME.fullmatch(name)), None)
    if bad is not None:
        raise bad_request(f"{param}.{bad}.name", "1 to 64 letters, digits, '_', '.' or '-'")
    seen: set[str] = set()
    for name in names:  # one pass: a request may send very many tools
        if name in seen:
            raise bad_request(param, f"the function name {name!r} is used twice")
        seen.add(name)
    choice_param = param.replace("tools", "tool_choice")
    if choice is not None and choice.mode != "none" and not tools:
        raise bad_request(choice_param, "needs tools")
    if choice is not None and choice.mode == "named" and choice.name not in names:
        raise bad_request(choice_param, f"{choice.name!r} is not one of the tools")


def constrained_output(tools: list[Tool], choice: ToolChoice,
                       parallel: bool) -> common_pb2.StructuredOutput | None:
    """The structured output `required` or a named function sets (None for the others):
    `required` a non-empty list of {"name": one tool's, "parameters": its arguments} (one call
    unless `parallel`), a named function its arguments."""
    if choice.mode == "named":
        tool = next(t for t in tools if t.name == choice.name)
        return common_pb2.StructuredOutput(json_schema=json.dumps(tool.parameters
                                                                  or ANY_PARAMETERS))
    if choice.mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": tool.name},
                                                "parameters": tool.parameters or ANY_PARAMETERS},
              "required": ["name", "parameters"], "additionalProperties": False}
             for tool in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return common_pb2.StructuredOutput(json_schema=json.dumps(schema))


def string_value(raw: str) -> str:
    """A JSON string's value from the text between its quotes; a model's bad escape (`\\q`)
    or raw control character is read as written rather than failing the answer."""
    try:
        return json.loads(f'"{raw}"', strict=False)
    except json.JSONDecodeError:
        return raw


class _CallObject:
    """One call object, read character by character: its name, once complete, and the raw text
    of its arguments' value as it grows."""

    def __init__(self, argument_keys: tuple[str, ...]):
        self.argument_keys = argument_keys
        self.depth = 0
        self.in_string = self.escaped = False
        self.member_key: str | None = None  # the top-level member whose value is being read
        self.reading_key = True  # at the top level, the next string is a key
        self.top_string: list[str] = []  # a top-level string (key or value), raw
        self.name: str | None = None
        self.arguments: list[str] = []  # the raw text of the arguments' value
        self.in_arguments = False
        self.done = False

    def feed(self, char: str) -> None:
        top = self.depth == 1
        if self.in_arguments and not (top and not self.in_string and char in ",}"):
            if self.arguments or not char.isspace():
                self.arguments.append(char)
        if self.in_string:
            self._string_char(char, top)
        elif char == '"':
            self.in_string = True
            self.top_string = []
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.in_arguments = self.in_arguments and self.depth > 0
            self.done = self.depth == 0
        elif top and char == ":":
            self.reading_key = False
            self.in_arguments = self.member_key in self.argument_keys
        elif top and char == ",":
            self.reading_key, self.member_key, self.in_arguments = True, None, False

    def _string_char(self, char: str, top: bool) -> None:
        if self.escaped:
            self.escaped = False
        elif char == "\\":
            self.escaped = True
        elif char == '"':
            self.in_string = False
            if top:
                self._top_string_ended(string_value("".join(self.top_string)))
            return
        if top:
            self.top_string.append(char)

    def _top_string_ended(self, value: str) -> None:
        if self.reading_key:
            self.member_key = value
        elif self.member_key == "name" and self.name is None:
            self.name = value

    def argument_text(self, final: bool) -> str:
        """The arguments so far. A JSON string value (some models encode the object as a
        string) is its content, known only when it is complete (`final`)."""
        text = "".join(self.arguments)
        if not text.startswith('"'):
            return text
        if not (final and self.done):
            return ""
        try:
            value = json.loads(text, strict=False)
        except json.JSONDecodeError:
            return text
        return value if isinstance(value, str) else text


@dataclass
class _Call:
    object: _CallObject
    index: int | None = None  # assigned once its name is known
    id: str = ""
    sent: int = 0  # characters of its arguments already sent


class CallReader:
    """One choice's answer in a CallSyntax: content before the first marker, then calls."""

    def __init__(self, syntax: CallSyntax):
        self.syntax = syntax
        self.pending = ""  # content not yet released (it may begin a marker)
        self.region: list[str] | None = None  # the text from the first marker on
        self.plain = False  # decided: no calls (an at_start syntax that did not start so)
        self.calls: list[_Call] = []

    @property
    def called(self) -> bool:
        return any(call.index is not None for call in self.calls)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self.region is not None:
            return "", self._read_calls(text, final=False)
        if self.plain:
            return text, []
        self.pending += text
        start = self._calls_start()
        if start is None:
            release = self._releasable()
            content, self.pending = self.pending[:release], self.pending[release:]
            return content, []
        content, rest = self.pending[:start], self.pending[start:]
        self.pending, self.region = "", []
        return content, self._read_calls(rest, final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The rest at the answer's end. Calls text in which no call was named is content after
        all (e.g. an answer that is JSON but no call), never dropped."""
        if self.region is None:
            content, self.pending = self.pending, ""
            return content, []
        deltas = self._read_calls("", final=True)
        return ("" if self.called else "".join(self.region)), deltas

    def _calls_start(self) -> int | None:
        if self.syntax.at_start:
            body = self.pending.lstrip()
            if body and any(body.startswith(m) for m in self.syntax.markers):
                return len(self.pending) - len(body)
            self.plain = bool(body) and not any(m.startswith(body) for m in self.syntax.markers)
            return None
        found = [i for i in (self.pending.find(m) for m in self.syntax.markers) if i >= 0]
        return min(found) if found else None

    def _releasable(self) -> int:
        """How much pending content cannot begin a marker."""
        if self.plain:
            return len(self.pending)
        if self.syntax.at_start:
            return 0
        held = max((k for m in self.syntax.markers for k in range(1, len(m))
                    if self.pending.endswith(m[:k])), default=0)
        return len(self.pending) - held

    def _read_calls(self, text: str, final: bool) -> list[ToolCallDelta]:
        self.region.append(text)
        touched: list[_Call] = []
        for char in text:
            current = self.calls[-1] if self.calls and not self.calls[-1].object.done else None
            if current is None:
                if char != "{":
                    continue  # wrappers and separators between calls
                current = _Call(_CallObject(self.syntax.argument_keys))
                self.calls.append(current)
            current.object.feed(char)
            if not touched or touched[-1] is not current:
                touched.append(current)
        if final and self.calls:
            touched.append(self.calls[-1])  # a string value completes only at the end
        unique = {id(call): call for call in touched}.values()
        return [delta for call in unique if (delta := self._delta(call, final)) is not None]

    def _delta(self, call: _Call, final: bool) -> ToolCallDelta | None:
        if call.object.name is None:
            return None  # arguments wait for the name, which the first delta carries
        delta = ToolCallDelta(index=-1)
        if call.index is None:
            call.index = sum(c.index is not None for c in self.calls)
            call.id = self.syntax.new_id()
            delta.id, delta.name = call.id, call.object.name
        delta.index = call.index
        arguments = call.object.argument_text(final)
        delta.arguments, call.sent = arguments[call.sent:], max(call.sent, len(arguments))
        return delta if delta.id or delta.arguments else None


class NamedCallReader:
    """The answer to a named tool_choice: all of it is the function's arguments."""

    called = True

    def __init__(self, name: str):
        self.name = name
        self.id: str | None = None

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self.id is None:
            self.id = new_call_id()
            return "", [ToolCallDelta(0, self.id, self.name, text)]
        return "", [ToolCallDelta(0, arguments=text)] if text else []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return "", []


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask of its generation: the structured output to sample under and
    how to read each choice's answer (None: plain content)."""

    structured_output: common_pb2.StructuredOutput | None = None
    new_reader: Callable[[], CallReader | NamedCallReader] | None = None
    # `finish_reason` when a call was read (OpenAI's: "stop" for a named function).
    finish_reason: str = "tool_calls"
    # The markers the reader looks for: kept in the text where they are special tokens.
    markers: tuple[str, ...] = ()
    # The request's tools field, as its API spells it (the structured output comes from it).
    tools_param: str = "tools"

    def param(self, field: str, otherwise: Callable[[str], str]) -> str:
        """How the request names SamplingParams field `field`: its tools where their schemas
        set the structured output, else as `otherwise` says."""
        if self.structured_output is not None and field.startswith("structured_output"):
            return self.tools_param
        return otherwise(field)

    def adapt(self, sampling: common_pb2.SamplingParams, tokenizer,
              choice_param: str = "tool_choice") -> None:
        """`sampling` made to serve the plan: the structured output it needs (refused beside
        the client's own), and special tokens left in the text when a marker is one
        (Mistral's [TOOL_CALLS]: detokenizing would drop it, and with it the calls)."""
        if self.structured_output is not None:
            if sampling.HasField("structured_output"):
                raise bad_request(choice_param, '"required" or a named function constrains '
                                  "the answer: not with response_format or structured_outputs")
            sampling.structured_output.CopyFrom(self.structured_output)
        if self.markers and set(self.markers) & special_tokens(tokenizer):
            sampling.skip_special_tokens = False


# A request without tools, or with tool_choice "none".
NO_TOOLS = ToolPlan()


def special_tokens(tokenizer) -> set[str]:
    """The texts of a tokenizer's special tokens (those decoding skips)."""
    return {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}


def plan_tools(tools: list[Tool], choice: ToolChoice | None, parallel: bool,
               parser: str | None, param: str = "tools") -> ToolPlan:
    """The plan for a request's tools; `parser`: the gateway's --tool-call-parser with
    --enable-auto-tool-choice (None: `auto` is refused). An unset choice is OpenAI's default:
    `auto` with tools, `none` without."""
    check_tools(tools, choice, param)
    choice_param = param.replace("tools", "tool_choice")
    if choice is None:
        choice = ToolChoice("auto" if tools else "none")
    if choice.mode == "none":
        return NO_TOOLS
    if choice.mode == "auto":
        if parser is None:
            raise bad_request(choice_param, '"auto" needs a gateway started with '
                              "--enable-auto-tool-choice and --tool-call-parser; set "
                              'tool_choice to "none", "required" or a function')
        syntax = PARSERS[parser]
        return ToolPlan(new_reader=lambda: CallReader(syntax), markers=syntax.markers)
    output = constrained_output(tools, choice, parallel)
    if choice.mode == "named":
        return ToolPlan(output, lambda: NamedCallReader(choice.name), finish_reason="stop",
                        tools_param=param)
    return ToolPlan(output, lambda: CallReader(REQUIRED_SYNTAX), tools_param=param)


def merge_calls(calls: Iterable[ToolCallDelta], into: list[ToolCallDelta]) -> None:
    """Deltas added to whole calls (by index), for an answer that is not streamed."""
    for delta in calls:
        if delta.index == len(into):
            into.append(ToolCallDelta(delta.index, delta.id, delta.name, ""))
        into[delta.index].arguments += delta.arguments

