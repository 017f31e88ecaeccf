"""Structured output's grammars (docs/structured_output.md): the contract's `StructuredOutput`
as an llguidance grammar, and the check every service applies before it accepts one (the
gateway, the scheduler's admission, the executor), so a grammar that cannot compile is a 400
naming its field, not a failed step. No torch: the gateway imports this."""

from __future__ import annotations

import json

import llguidance

from pagedserve.v1 import common_pb2

# The most bytes a spec may hold (a JSON schema, a grammar, the choices together): far above
# real tool and extraction schemas, low enough that compiling one costs little.
MAX_SPEC_BYTES = 128 * 1024
MAX_CHOICES = 1024
# What compiling and running one request's grammar may cost (llguidance counts it).
LIMITS = llguidance.LLParserLimits(max_grammar_size=500_000, verbose_errors=True)
# JSON without free whitespace: the separators are fixed, so a model cannot spend its tokens on
# blank lines, a known failure of small models under flexible whitespace.
JSON_OPTIONS = {"whitespace_flexible": False}
ANY_OBJECT = '{"type": "object"}'


class GrammarError(ValueError):
    """A spec that cannot be served; `field` names its kind (structured_output.<kind>)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def grammar_of(spec: common_pb2.StructuredOutput) -> str:
    """The llguidance grammar of `spec`, unchecked (see `check_spec`)."""
    kind = spec.WhichOneof("kind")
    field = f"structured_output.{kind}"
    try:
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema,
                                                                 defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT,
                                                                 defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice.choices))
        if kind == "grammar":
            return llguidance.grammar_from("grammar", spec.grammar)
    except ValueError as exc:
        raise GrammarError(field, str(exc)) from None
    raise GrammarError("structured_output", "no kind is set")


def check_spec(spec: common_pb2.StructuredOutput) -> str:
    """The spec's grammar, once it is known to compile within LIMITS; GrammarError naming the
    field otherwise."""
    kind = spec.WhichOneof("kind")
    field = f"structured_output.{kind}"
    if kind == "choice" and not 0 < len(spec.choice.choices) <= MAX_CHOICES:
        raise GrammarError(field, f"1 to {MAX_CHOICES} strings")
    if kind is not None and spec.ByteSize() > MAX_SPEC_BYTES:
        raise GrammarError(field, f"at most {MAX_SPEC_BYTES} bytes")
    grammar = grammar_of(spec)
    error = llguidance.LLMatcher.validate_grammar(grammar, limits=LIMITS)
    if error:
        raise GrammarError(field, error)
    return grammar
