"""Structured output (docs/structured_output.md): the specs' checks, the HTTP fields that set
them, and answers that follow them: on the default model over HTTP with the stock `openai`
client (validated by the `jsonschema` package, Python's `re`), and through the engine with
speculative decoding, whose tokens must be those without it."""

import json
import re

import jsonschema
import openai
import pytest

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.runtime.grammars import GrammarError, check_spec
from pagedserve.testing.processes import running_stack
from pagedserve.v1 import common_pb2

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "population": {"type": "integer", "minimum": 0},
    "capital": {"type": "boolean"},
    "languages": {"type": "array", "items": {"enum": ["French", "English", "German"]},
                  "minItems": 1, "maxItems": 3}},
    "required": ["city", "population", "capital", "languages"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]+, [0-9]{4}"
CHOICES = ["Paris", "London", "Berlin"]


@pytest.mark.parametrize("spec, field", [
    (common_pb2.StructuredOutput(json_schema="{not json"), "structured_output.json_schema"),
    (common_pb2.StructuredOutput(json_schema='{"type": "strung"}'),
     "structured_output.json_schema"),
    (common_pb2.StructuredOutput(regex="[0-9"), "structured_output.regex"),
    (common_pb2.StructuredOutput(grammar="start: undefined_rule"), "structured_output.grammar"),
    (common_pb2.StructuredOutput(choice=common_pb2.Choices()), "structured_output.choice"),
    (common_pb2.StructuredOutput(regex="a" * 200_000), "structured_output.regex"),
    (common_pb2.StructuredOutput(), "structured_output"),
])
def test_a_spec_that_cannot_compile_is_refused_naming_its_field(spec, field):
    with pytest.raises(GrammarError) as error:
        check_spec(spec)
    assert error.value.field == field


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"response_format": {"type": "json_object"}},
     common_pb2.StructuredOutput(json_object=True)),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"json": SCHEMA}},
     common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": REGEX}}, common_pb2.StructuredOutput(regex=REGEX)),
    ({"structured_outputs": {"choice": CHOICES}},
     common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=CHOICES))),
    ({"structured_outputs": {"grammar": 'start: "a"'}},
     common_pb2.StructuredOutput(grammar='start: "a"')),
    ({"structured_outputs": {"json_object": True}},
     common_pb2.StructuredOutput(json_object=True)),
])
def test_the_http_fields_become_the_contracts_spec(body, expected):
    for request in (CompletionRequest(prompt="x", **body),
                    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **body)):
        params = request.sampling_params(8, None)
        assert (params.structured_output if params.HasField("structured_output")
                else None) == expected


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
])
def test_conflicting_or_incomplete_fields_are_a_400_naming_them(body, param):
    with pytest.raises(GatewayError) as error:
        CompletionRequest(prompt="x", **body).sampling_params(8, None)
    assert error.value.status == 400 and error.value.param == param


def test_beam_search_refuses_structured_output():
    request = CompletionRequest(prompt="x", use_beam_search=True, n=2,
                                response_format={"type": "json_object"})
    with pytest.raises(GatewayError) as error:
        request.beam_search_params(8, 20)
    assert error.value.param == "response_format"


# -- answers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(default_model, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("structured") / "log", "--model-cache-dir",
                       str(default_model.path.parent.parent), "--kv-cache-gib", "0.5") as stack:
        with openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0) as client:
            yield client


def ask(client, content: str, temperature: float, n: int = 1, **fields):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}],
        max_tokens=120, temperature=temperature, n=n, seed=7, **fields)


@pytest.mark.parametrize("temperature, n", [(0.0, 1), (1.0, 4)], ids=["greedy", "sampled"])
def test_json_schema_answers_validate_against_their_schema(client, temperature, n):
    reply = ask(client, "Describe Paris as JSON.", temperature, n, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


@pytest.mark.parametrize("temperature, n", [(0.0, 1), (1.0, 4)], ids=["greedy", "sampled"])
def test_regex_and_choice_answers_match(client, temperature, n):
    reply = ask(client, "Name a city and a year.", temperature, n,
                extra_body={"structured_outputs": {"regex": REGEX}})
    assert all(re.fullmatch(REGEX, c.message.content) for c in reply.choices), reply
    reply = ask(client, "Which is the capital of France?", temperature, n,
                extra_body={"structured_outputs": {"choice": CHOICES}})
    assert all(c.message.content in CHOICES for c in reply.choices), reply


def test_json_object_answers_parse_as_objects(client):
    reply = ask(client, "Give me a JSON object about cats.", 1.0, 3,
                response_format={"type": "json_object"})
    ended = [c for c in reply.choices if c.finish_reason == "stop"]
    assert ended, reply  # otherwise the test would check nothing
    for choice in ended:
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_schema_that_cannot_compile_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "x", 0.0, response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "strung"}}})
    assert error.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("speculative", [
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
    "draft"], ids=["ngram", "draft_model"])
def test_speculation_keeps_the_grammar_and_the_tokens(tiny_llama_dir, speculative):
    """Greedy and seeded answers under each spec: the same tokens with speculation as without
    (the grammar masks each verified position after the proposals before it, and advances by
    accepted tokens only), and each follows its spec."""
    from pagedserve.entrypoints.offline import LLM

    if speculative == "draft":
        speculative = {"model": str(tiny_llama_dir), "num_speculative_tokens": 3}
    # A schema short enough that the tiny random model's sampled answers end within max_tokens.
    small = {"type": "object", "properties": {"n": {"type": "integer"},
                                              "s": {"enum": ["x", "y"]}},
             "required": ["n", "s"], "additionalProperties": False}
    specs = [common_pb2.StructuredOutput(regex="[0-9]{3}-[a-c]+"),
             common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=CHOICES)),
             common_pb2.StructuredOutput(json_schema=json.dumps(small))]
    params = [common_pb2.SamplingParams(max_tokens=48, temperature=t, seed=3, n=2,
                                        structured_output=spec)
              for spec in specs for t in (0.0, 1.0)]
    runs = []
    for config in (None, speculative):
        with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01, max_model_len=256,
                 speculative_config=config) as llm:
            runs.append([[(o.token_ids, o.text, o.finish_reason) for o in out.outputs]
                         for out in llm.generate(["a prompt"] * len(params), params)])
            assert llm.blocks.num_used_blocks == 0
    assert runs[0] == runs[1]
    checked = set()
    for outputs, p in zip(runs[0], params, strict=True):
        kind = p.structured_output.WhichOneof("kind")
        for _, text, finish in outputs:
            if finish != "stop":  # cut by max_tokens: a prefix
                continue
            checked.add(kind)
            if kind == "choice":
                assert text in CHOICES
            elif kind == "regex":
                assert re.fullmatch("[0-9]{3}-[a-c]+", text)
            else:
                jsonschema.validate(json.loads(text), small)
    assert checked == {"choice", "regex", "json_schema"}  # each kind ended at least once


@pytest.mark.slow
def test_two_tensor_parallel_ranks_follow_the_grammar_as_one(tiny_llama_dir):
    """Rank 0 alone holds the matchers and masks (it samples); the followers compute their
    slices of the same logits: the answers are one rank's."""
    from pagedserve.entrypoints.offline import LLM

    params = [common_pb2.SamplingParams(max_tokens=32, temperature=t, seed=3,
                                        structured_output=common_pb2.StructuredOutput(
                                            json_schema=json.dumps(SCHEMA)))
              for t in (0.0, 1.0)]
    runs = []
    for size in (1, 2):
        with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01, max_model_len=128,
                 tensor_parallel_size=size) as llm:
            runs.append([out.outputs[0].token_ids for out in llm.generate(["x"] * 2, params)])
    assert runs[0] == runs[1]


def test_an_answer_the_grammar_ended_stays_ended_under_min_tokens(tiny_llama_dir):
    """When the grammar allows only EOS and min_tokens forbids it, the grammar wins: the answer
    is the grammar's, padded with EOS (which min_tokens keeps from ending it), never a token
    the grammar refuses."""
    from pagedserve.entrypoints.offline import LLM

    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01, max_model_len=128) as llm:
        eos = llm.eos_token_ids
        for temperature in (0.0, 1.0):
            [out] = llm.generate(["x"], common_pb2.SamplingParams(
                max_tokens=10, min_tokens=6, temperature=temperature, seed=1,
                structured_output=common_pb2.StructuredOutput(regex="ab")))
            output = out.outputs[0]
            assert output.text == "ab" and output.finish_reason == "stop"
            assert set(output.token_ids[2:]) <= set(eos) and len(output.token_ids) == 6
