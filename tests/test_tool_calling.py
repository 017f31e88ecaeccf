"""Tool calling (docs/tool_calling.md): the call reader of each --tool-call-parser against calls
written with `json.dumps`, however the text is cut into deltas; the schemas of `required` and
named choices against `jsonschema`; the request checks; and round trips through a running
stack with the stock `openai` client on templates that use tools (the model asks, the client
answers with a tool message, the model replies), streamed and not, over HTTP and gRPC."""

import json

import grpc
import hypothesis.strategies as st
import jsonschema
import openai
import pytest
from hypothesis import given, settings

from pagedserve.gateway.errors import GatewayError
from pagedserve.gateway.openai_protocol import ChatCompletionRequest
from pagedserve.gateway.tool_calls import (
    PARSERS,
    REQUIRED_SYNTAX,
    CallReader,
    NamedCallReader,
    Tool,
    ToolChoice,
    constrained_output,
    merge_calls,
    plan_tools,
)
from pagedserve.v1 import common_pb2

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [Tool("get_weather", "Current weather of a city", WEATHER),
         Tool("get_time", "Current time in a zone", TIME)]
# Arguments that a naive reader gets wrong: braces and quotes inside strings, escapes, nesting,
# text beyond ASCII.
CALLS = [("get_weather", {"city": "Paris", "note": 'a "}" {brace}\\', "x": [1, {"y": None}]}),
         ("get_time", {"zone": "Europe/Oslo ☃"})]


def written(parser: str, content: str = "") -> str:
    """CALLS as a model of `parser`'s family writes them."""
    if parser == "hermes":
        return content + "".join(
            f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>\n'
            for n, a in CALLS)
    if parser == "llama3_json":
        return "<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a})
                                            for n, a in CALLS)
    if parser == "mistral":
        return content + "[TOOL_CALLS] " + json.dumps([{"name": n, "arguments": a}
                                                       for n, a in CALLS])
    return json.dumps([{"name": n, "parameters": a} for n, a in CALLS])  # required


def read(reader, text: str, piece: int) -> tuple[str, list]:
    content, calls = "", []
    for start in range(0, len(text), piece):
        new, deltas = reader.feed(text[start:start + piece])
        content += new
        merge_calls(deltas, calls)
    new, deltas = reader.finish()
    merge_calls(deltas, calls)
    return content + new, calls


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "required"])
@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
def test_each_parser_reads_the_calls_however_the_text_is_cut(parser, piece):
    syntax = REQUIRED_SYNTAX if parser == "required" else PARSERS[parser]
    content = "" if syntax.at_start else "Let me look that up. "
    got, calls = read(CallReader(syntax), written(parser, content), piece)
    assert got == content
    # The arguments are the model's text of the value, to the character.
    assert [(c.index, c.name, c.arguments) for c in calls] == \
        [(i, name, json.dumps(arguments)) for i, (name, arguments) in enumerate(CALLS)]
    assert len({c.id for c in calls}) == 2
    if parser == "mistral":  # its templates accept no other ids
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(opening=st.sampled_from(["", "ok ", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>",
                                 "<tool", " {"]),
       pieces=st.lists(st.sampled_from([
           '{"name": "', '"f"', '", "arguments": ', '"parameters": ', '"', "\\", "\\q",
           '\\"', "\\u12", "{", "}", "[", "]", ",", ";", ":", " ", "\n", "a", "é",
           "</tool_call>\n<tool_call>", "[TOOL"]), max_size=24),
       parser=st.sampled_from(["hermes", "llama3_json", "mistral"]), cut=st.integers(1, 7))
def test_a_tool_call_reader_reads_any_text_the_same_however_it_is_cut(opening, pieces, parser,
                                                                     cut):
    """Whatever a model writes, cut into deltas of any size: the same content and calls as the
    text read whole, nothing raised, and content is a part of the text, in order."""
    text = opening + "".join(pieces)
    answers = [read(CallReader(PARSERS[parser]), text, size) for size in (cut, len(text) or 1)]
    answers = [(content, [(c.index, c.name, c.arguments) for c in calls])
               for content, calls in answers]
    assert answers[0] == answers[1]
    content, calls = answers[0]
    assert text.startswith(content) if calls else content == text


def test_arguments_stream_as_fragments_after_the_name():
    reader = CallReader(PARSERS["hermes"])
    text = written("hermes")
    first = []
    for start in range(0, len(text), 4):
        first += reader.feed(text[start:start + 4])[1]
    assert first[0].name == "get_weather" and first[0].id
    assert all(d.id is None and d.name is None for d in first[1:] if d.index == 0)
    assert len([d for d in first if d.index == 0]) > 5  # fragments, not one piece at the end


@pytest.mark.parametrize("parser, text", [
    ("hermes", "I would use <tool_ca but I will not."),
    ("hermes", "no calls <tool_call"),  # cut off in the marker: content after all
    ("llama3_json", '{"answer": 42}'),  # JSON that names no function is content
    ("llama3_json", 'Here: {"name": "get_time", "parameters": {}}'),  # calls start the answer
    ("mistral", "[TOOL_CALL] almost"),
])
def test_text_that_is_no_call_is_content_whole(parser, text):
    for piece in (1, 3, len(text)):
        reader = CallReader(PARSERS[parser])
        assert read(reader, text, piece) == (text, [])
        assert not reader.called


def test_bad_escapes_and_raw_newlines_in_a_call_are_read_as_written():
    text = '<tool_call>{"name": "get\\q", "arguments": "{\\"a\\": \n1}"}</tool_call>'
    content, [call] = read(CallReader(PARSERS["hermes"]), text, 3)
    assert (content, call.name, call.arguments) == ("", "get\\q", '{"a": \n1}')


def test_a_named_choice_reads_the_whole_answer_as_arguments():
    reader = NamedCallReader("get_time")
    content, [call] = read(reader, '{"zone": "UTC"}', 3)
    assert content == "" and call.name == "get_time" and call.arguments == '{"zone": "UTC"}'


def test_required_constrains_to_calls_of_the_tools():
    schema = json.loads(constrained_output(TOOLS, ToolChoice("required"), True).json_schema)
    jsonschema.validate([{"name": "get_time", "parameters": {"zone": "UTC"}},
                         {"name": "get_weather",
                          "parameters": {"city": "Oslo", "unit": "celsius"}}], schema)
    for bad in ([], [{"name": "get_time", "parameters": {"city": "Oslo", "unit": "celsius"}}],
                [{"name": "launch", "parameters": {}}], {"name": "get_time"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = json.loads(constrained_output(TOOLS, ToolChoice("required"), False).json_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "parameters": {"zone": "a"}}] * 2, one)
    named = constrained_output(TOOLS, ToolChoice("named", "get_time"), True)
    assert json.loads(named.json_schema) == TIME


@pytest.mark.parametrize("tools, choice, parser, param", [
    (TOOLS, None, None, "tool_choice"),  # auto by default, and no parser
    (TOOLS, ToolChoice("auto"), None, "tool_choice"),
    ([], ToolChoice("required"), "hermes", "tool_choice"),
    (TOOLS, ToolChoice("named", "launch"), "hermes", "tool_choice"),
    ([TOOLS[0], TOOLS[0]], ToolChoice("required"), "hermes", "tools"),
    ([Tool("get_time\n")], ToolChoice("required"), "hermes", "tools.0.name"),
])
def test_tool_requests_that_cannot_be_served_are_a_400_naming_the_field(tools, choice, parser,
                                                                        param):
    with pytest.raises(GatewayError) as error:
        plan_tools(tools, choice, True, parser)
    assert error.value.status == 400 and error.value.param == param


def test_no_tools_or_none_reads_nothing():
    assert plan_tools([], None, True, None).new_reader is None
    assert plan_tools(TOOLS, ToolChoice("none"), True, None).new_reader is None


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)


def test_the_choice_constrains_the_answer_and_refuses_the_clients_own(tiny_tokenizer):
    body = chat_request(tools=[t.template_json() for t in TOOLS],
                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    plan = plan_tools(body.tool_list(), body.choice(), True, None)
    sampling = body.sampling_params(8, None)
    plan.adapt(sampling, tiny_tokenizer)
    assert json.loads(sampling.structured_output.json_schema) == TIME
    assert plan.param("structured_output.json_schema", body.param) == "tools"
    assert plan.param("temperature", body.param) == "temperature"
    sampling = chat_request(structured_outputs={"regex": "a"}).sampling_params(8, None)
    with pytest.raises(GatewayError) as error:
        plan.adapt(sampling, tiny_tokenizer)
    assert error.value.param == "tool_choice"


def test_a_marker_that_is_a_special_token_stays_in_the_text(tiny_tokenizer):
    """Mistral's [TOOL_CALLS] is a special token: decoding with skip_special_tokens would drop
    it, and the calls with it."""
    plan = plan_tools(TOOLS, ToolChoice("auto"), True, "mistral")
    sampling = common_pb2.SamplingParams()
    plan.adapt(sampling, tiny_tokenizer)
    assert not sampling.HasField("skip_special_tokens")
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]},
                                      replace_extra_special_tokens=False)
    plan.adapt(sampling, tiny_tokenizer)
    assert sampling.HasField("skip_special_tokens") and not sampling.skip_special_tokens


@pytest.fixture
def tiny_tokenizer():
    from pagedserve.testing.tiny_models import byte_level_tokenizer

    return byte_level_tokenizer()


CALL = {"id": "c1", "type": "function",
        "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "sunny"}, "messages.1.tool_call_id"),
    ({"role": "user", "content": None}, "messages.1.content"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "messages.1.content"),
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "messages.1.tool_calls"),
])
def test_messages_that_break_their_roles_rules_are_a_400_naming_the_field(message, param):
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}, message])
    with pytest.raises(GatewayError) as error:
        body.template_messages()
    assert error.value.param == param


def test_content_parts_other_than_text_are_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "content" in str(error.value)


def test_call_arguments_sent_back_must_be_a_json_object():
    body = ChatCompletionRequest(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
            "name": "get_time", "arguments": '{"zone": '}}]}])
    with pytest.raises(GatewayError) as error:
        body.template_messages()
    assert error.value.param == "messages.1.tool_calls.0.function.arguments"


def test_messages_reach_the_template_as_it_reads_them():
    body = ChatCompletionRequest(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "noon"}])
    assert body.template_messages() == [
        {"role": "system", "content": "a\nb"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]},
        {"role": "tool", "content": "noon", "tool_call_id": "c1"}]


# -- round trips through a running stack ------------------------------------------------------

OPENAI_TOOLS = [t.template_json() for t in TOOLS]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# What each family's answer is forced to (structured output) so that a random model calls.
CALL_REGEX = {
    "hermes": r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
              r'"unit": "celsius"\}\}\n</tool_call>',
    "llama3_json": r'\{"name": "get_weather", "parameters": \{"city": "(Paris|Rome)", '
                   r'"unit": "celsius"\}\}',
    "mistral": r' \[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
               r'"unit": "celsius"\}\}\]',
}


def forced_call(parser: str, model_dir) -> dict:
    """The structured output that makes the model write CALL_REGEX's call. Mistral's marker is
    a special token, which a grammar names by id (llguidance's mask allows it for the literal
    text too, but its matcher then refuses it)."""
    if parser != "mistral":
        return {"regex": CALL_REGEX[parser]}
    from transformers import AutoTokenizer

    marker = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("[TOOL_CALLS]")
    return {"grammar": f"start: <[{marker}]> /{CALL_REGEX[parser]}/"}


@pytest.fixture(scope="module", params=sorted(CALL_REGEX))
def served(request, default_model, tmp_path_factory):
    """A stack per parser: a tiny model with the default model's tokenizer and the parser's
    family's template."""
    from pagedserve.testing.processes import running_stack
    from pagedserve.testing.tool_templates import save_tool_calling_model

    parser = request.param
    model = save_tool_calling_model(tmp_path_factory.mktemp(f"tools-{parser}"),
                                    default_model.path, parser)
    with running_stack(tmp_path_factory.mktemp("log") / "log", "--model", str(model),
                       "--kv-cache-gib", "0.05", "--enable-auto-tool-choice",
                       "--tool-call-parser", parser) as stack:
        with openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0) as client:
            yield parser, model, client, stack


# Tests of what every parser shares (constrained choices, refusals, gRPC) run on one stack.
ONE_PARSER = pytest.mark.parametrize("served", ["hermes"], indirect=True)


def streamed_message(stream) -> tuple[str, list[dict], str]:
    """A streamed answer put together as OpenAI's documentation says: content appended, each
    call's id, type and name from its first delta, arguments appended by index."""
    content, calls, finish = "", [], None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index == len(calls):
                assert delta.id and delta.type == "function" and delta.function.name
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            else:
                assert delta.id is None and delta.function.name is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.slow
def test_a_tool_call_round_trip_streamed_and_not(served):
    """auto: the model's answer (forced into its family's format) is read as a call, streamed as
    OpenAI streams calls; the client answers with a tool message; the next prompt holds the call
    and the result, rendered by the template."""
    parser, model_dir, client, stack = served
    model = model_dir.name
    ask = dict(model=model, messages=QUESTION, tools=OPENAI_TOOLS, max_tokens=80,
               temperature=0, extra_body={"structured_outputs": forced_call(parser, model_dir)})
    reply = client.chat.completions.create(**ask)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather"
    jsonschema.validate(arguments, WEATHER)
    content, calls, finish = streamed_message(client.chat.completions.create(**ask, stream=True))
    assert finish == "tool_calls" and not content.strip()
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather",
                                                            call.function.arguments)]

    conversation = [*QUESTION, choice.message,  # sent back as the SDK gave it
                    {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"}]
    answer = client.chat.completions.create(model=model, messages=conversation,
                                            tools=OPENAI_TOOLS, tool_choice="none",
                                            max_tokens=5, temperature=0)
    assert answer.choices[0].message.tool_calls is None
    prompt = tokenized(stack, model, conversation)
    assert answer.usage.prompt_tokens == len(prompt["tokens"])
    rendered = detokenized(stack, model, prompt["tokens"])
    assert "22 degrees, sunny" in rendered and '"city": "' in rendered
    if parser == "mistral":
        assert call.id in rendered  # its template checked the id: 9 alphanumerics


def tokenized(stack, model: str, conversation: list) -> dict:
    from pagedserve.testing.processes import post_json

    messages = [m if isinstance(m, dict) else m.model_dump(exclude_unset=True)
                for m in conversation]
    status, reply, _ = post_json(f"{stack}/tokenize", json.dumps(
        {"model": model, "messages": messages, "tools": OPENAI_TOOLS}).encode())
    assert status == 200, reply
    return reply


def detokenized(stack, model: str, tokens: list[int]) -> str:
    from pagedserve.testing.processes import post_json

    status, reply, _ = post_json(f"{stack}/detokenize",
                                 json.dumps({"model": model, "tokens": tokens}).encode())
    assert status == 200, reply
    return reply["prompt"]


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@ONE_PARSER
def test_required_and_named_choices_always_give_valid_calls(served, temperature):
    _, model_dir, client, _ = served
    model = model_dir.name
    for stream in (False, True):
        ask = dict(model=model, messages=QUESTION, tools=OPENAI_TOOLS, max_tokens=120,
                   temperature=temperature, seed=5, n=1 if stream else 3)
        for choice, finish_reason in (("required", "tool_calls"),
                                      ({"type": "function", "function": {"name": "get_time"}},
                                       "stop")):
            if stream:
                _, calls, finish = streamed_message(client.chat.completions.create(
                    **ask, tool_choice=choice, stream=True))
                answers = [(calls, finish)]
            else:
                reply = client.chat.completions.create(**ask, tool_choice=choice)
                answers = [([{"name": c.function.name, "arguments": c.function.arguments}
                             for c in r.message.tool_calls], r.finish_reason)
                           for r in reply.choices]
            for calls, finish in answers:
                if finish == "length":
                    continue
                assert finish == finish_reason and calls
                for call in calls:
                    schema = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]
                    jsonschema.validate(json.loads(call["arguments"]), schema)
                if choice != "required":
                    assert [c["name"] for c in calls] == ["get_time"]


@pytest.mark.slow
@ONE_PARSER
def test_auto_without_a_call_is_content_and_bad_tool_requests_are_400s(served):
    _, model_dir, client, _ = served
    model = model_dir.name
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, tools=OPENAI_TOOLS, max_tokens=6, temperature=0,
        extra_body={"structured_outputs": {"regex": "It is sunny"}})
    assert reply.choices[0].message.content == "It is sunny"
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    for fields, param in (
            ({"tool_choice": {"type": "function", "function": {"name": "launch"}}},
             "tool_choice"),
            ({"tool_choice": "required", "response_format": {"type": "json_object"}},
             "tool_choice"),
            ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
             "tools.0.function.name")):
        body = {"tools": OPENAI_TOOLS, **fields}
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                           **body)
        assert error.value.body["param"] == param


@pytest.mark.slow
@ONE_PARSER
def test_grpc_chat_calls_tools_as_http_does(served):
    """The gRPC API's chat prompt carries tools and a choice; its deltas carry the calls."""
    from pagedserve.v1 import generation_pb2, generation_pb2_grpc

    parser, model_dir, client, stack = served
    model = model_dir.name
    chat = generation_pb2.ChatPrompt(
        messages=[generation_pb2.ChatMessage(role="user", content=QUESTION[0]["content"])],
        tools=[generation_pb2.Tool(name=t.name, description=t.description,
                                   parameters=json.dumps(t.parameters)) for t in TOOLS],
        tool_choice=generation_pb2.ToolChoice(function="get_time"))
    request = generation_pb2.GenerateRequest(
        model=model, chat=chat, sampling=common_pb2.SamplingParams(max_tokens=60,
                                                                  temperature=0.0))
    with grpc.insecure_channel(stack.grpc) as channel:
        replies = list(generation_pb2_grpc.GenerationStub(channel).Generate(request))
    deltas = [d for r in replies for d in r.choices]
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].name == "get_time" and calls[0].id
    arguments = "".join(c.arguments for c in calls)
    jsonschema.validate(json.loads(arguments), TIME)
    http = client.chat.completions.create(
        model=model, messages=QUESTION, tools=OPENAI_TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert http.choices[0].message.tool_calls[0].function.arguments == arguments
    assert deltas[-1].finish_reason == common_pb2.FINISH_REASON_STOP


@pytest.mark.slow
def test_the_offline_engine_renders_tools_as_transformers_does(default_model, tmp_path):
    from transformers import AutoTokenizer

    from pagedserve.entrypoints.offline import LLM
    from pagedserve.testing.tool_templates import save_tool_calling_model

    model = save_tool_calling_model(tmp_path / "hermes", default_model.path, "hermes")
    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template(QUESTION, tools=OPENAI_TOOLS, tokenize=False,
                                         add_generation_prompt=True)
    with LLM(str(model), dtype="float32", kv_cache_gib=0.05) as llm:
        [reply] = llm.chat(QUESTION, common_pb2.SamplingParams(max_tokens=2),
                           tools=OPENAI_TOOLS)
    assert "get_weather" in text
    assert reply.prompt_token_ids == tokenizer(text, add_special_tokens=False).input_ids
