"""The OpenAI-compatible HTTP API of a real `pagedserve up` stack (tiny model), through the
official `openai` client: completions and chat, streamed and not, n > 1, stop strings, seeds,
logprobs, usage; greedy text equals what `transformers` generates; errors in OpenAI's shape;
a disconnected stream frees its blocks."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve.entrypoints.offline import LLM
from pagedserve.runtime.beam_search import BeamSearchParams
from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import running_stack, wait_until_answers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack") / "log", "--model", str(tiny_llama_dir),
                       "--kv-cache-gib", "0.01") as stack:
        yield stack


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack}/v1", api_key="unused")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def greedy(prompt_ids: list[int], max_tokens: int) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)
        return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    return tokenizer, greedy


def test_models_lists_the_served_model(client, tiny_llama_dir):
    assert [m.id for m in client.models.list().data] == [tiny_llama_dir.name]


def test_completion_matches_transformers_streamed_or_not(client, reference, tiny_llama_dir):
    tokenizer, greedy = reference
    prompt = "the cat in a hat"
    expected = greedy(tokenizer(prompt).input_ids, 12)
    reply = client.completions.create(model=tiny_llama_dir.name, prompt=prompt, max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    stream = client.completions.create(model=tiny_llama_dir.name, prompt=prompt, max_tokens=12,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12


def test_prompt_logprobs_match_transformers(client, tiny_llama_dir):
    """vLLM's prompt_logprobs over HTTP: per prompt position (None for the first), the prompt
    token's logprob and rank and the top alternatives, as transformers computes them; in each
    completion choice (its own prompt's), and at the top of a chat response."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = [[5, 17, 42, 99, 7, 63], [8, 9, 10]]

    def expected(prompt: list[int]) -> list:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
        rows = []
        for position in range(1, len(prompt)):
            row = logprobs[position - 1]
            token = prompt[position]
            top = row.topk(2).indices.tolist()
            rows.append({t: (float(row[t]), int((row > row[t]).sum()) + 1)
                         for t in [token, *top]})
        return [None, *rows]

    reply = client.completions.create(model=tiny_llama_dir.name, prompt=prompts, max_tokens=2,
                                      n=2, extra_body={"prompt_logprobs": 2})
    chat = client.chat.completions.create(
        model=tiny_llama_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"prompt_logprobs": 1})
    answers = [(choice.prompt_logprobs, prompts[choice.index // 2]) for choice in reply.choices]
    assert len(answers) == 4
    for got, prompt in answers:
        assert got[0] is None and len(got) == len(prompt)
        for entries, want in zip(got[1:], expected(prompt)[1:], strict=True):
            assert {int(t) for t in entries} == set(want)
            for token, (logprob, rank) in want.items():
                assert entries[str(token)]["logprob"] == pytest.approx(logprob, abs=1e-4)
                assert entries[str(token)]["rank"] == rank
    assert chat.prompt_logprobs[0] is None and all(chat.prompt_logprobs[1:])
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=tiny_llama_dir.name, prompt="x", max_tokens=2,
                                  stream=True, extra_body={"prompt_logprobs": 1})
    assert error.value.body["param"] == "prompt_logprobs"


def test_chat_streamed_equals_not_streamed(client, tiny_llama_dir):
    messages = [{"role": "user", "content": "héllo 😀 世界"}]
    reply = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages,
                                           max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages,
                                            max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"


def test_n_seed_and_logprobs(client, tiny_llama_dir):
    kwargs = dict(model=tiny_llama_dir.name, prompt="in the", max_tokens=8, temperature=1.0,
                  n=3, seed=11, logprobs=2, extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len(first.choices) == 3 and first.usage.completion_tokens == 24
    # Each of the n sequences samples on its own (seed + index): 8 tokens at temperature 1 over
    # a random model's near-uniform distribution are not all alike by chance.
    assert len({c.text for c in first.choices}) == 3, [c.text for c in first.choices]
    logprobs = first.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 8 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_cached_tokens_do_not_leak_across_cache_salts(client, tiny_llama_dir):
    """`cached_tokens` tells whether a prompt's prefix was seen: only requests of the same
    cache_salt share cached blocks (the unsalted ones included)."""
    prompt = "a salted prefix of the cat and the hat, " * 3

    def cached(**salt) -> int:
        reply = client.completions.create(model=tiny_llama_dir.name, prompt=prompt,
                                          max_tokens=1, extra_body=salt)
        return reply.usage.prompt_tokens_details.cached_tokens
    assert cached(cache_salt="alice") == 0
    assert cached(cache_salt="alice") > 0  # the same salt hits
    assert cached(cache_salt="bob") == 0
    assert cached() == 0
    assert cached() > 0
    assert cached(cache_salt="carol") == 0


def test_stop_string_ends_the_choice(client, reference, tiny_llama_dir):
    tokenizer, greedy = reference
    prompt = "the cat"
    full = greedy(tokenizer(prompt).input_ids, 16)
    stop = full[5:8]
    reply = client.completions.create(model=tiny_llama_dir.name, prompt=prompt, max_tokens=16,
                                      temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_a_stop_string_in_one_of_n_choices_stops_only_that_sequence(client, stack,
                                                                     tiny_llama_dir):
    """Sequence i samples with seed + i, so stopping one leaves the other's tokens as they
    were; the scheduler is told to stop it (its log says so)."""
    def sample(**fields):
        return client.completions.create(model=tiny_llama_dir.name, prompt="the cat", n=2,
                                         max_tokens=24, temperature=1.0, seed=11,
                                         extra_body={"ignore_eos": True}, **fields).choices
    first, other = (c.text for c in sorted(sample(), key=lambda c: c.index))
    stop = next(first[i:i + 3] for i in range(2, len(first) // 2)  # well before the end
                if first[i:i + 3] not in other and first.index(first[i:i + 3]) == i)
    choices = sorted(sample(stop=[stop]), key=lambda c: c.index)
    assert (choices[0].text, choices[0].finish_reason) == (first[:first.index(stop)], "stop")
    assert (choices[1].text, choices[1].finish_reason) == (other, "length")
    deadline = time.monotonic() + 5
    while '"sequence stopped by the gateway"' not in stack.log_path.read_text():
        assert time.monotonic() < deadline, "the scheduler was not told"
        time.sleep(0.05)


def post(stack, path, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{stack}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": [10**7]}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    # beam search: what it cannot honour
    ({"prompt": "x", "use_beam_search": True, "stream": True}, "stream"),
    ({"prompt": "x", "use_beam_search": True, "temperature": 0.7}, "temperature"),
    ({"prompt": "x", "use_beam_search": True, "stop": ["a"]}, "stop"),
    ({"prompt": "x", "use_beam_search": True, "n": 11}, "n"),
    ({"prompt": "x", "use_beam_search": True, "length_penalty": 1e300}, "length_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True},
     "use_beam_search"),  # and no max_tokens
])
def test_bad_requests_are_400_naming_the_field(stack, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, reply = post(stack, path, body)
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]


def test_beam_search_over_http_matches_the_offline_engine(client, tiny_llama_dir):
    """vLLM's use_beam_search extension, completions and chat: the n best beams, best first,
    as the offline engine's beam search (tested against transformers in test_beam_search.py)
    finds them."""
    reply = client.completions.create(model=tiny_llama_dir.name, prompt="the cat", n=3,
                                      max_tokens=4, temperature=0,
                                      extra_body={"use_beam_search": True, "ignore_eos": True})
    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01) as llm:
        [expected] = llm.beam_search(["the cat"], BeamSearchParams(beam_width=3, max_tokens=4,
                                                                   ignore_eos=True))
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == \
        [beam.text for beam in expected.sequences]
    assert {c.finish_reason for c in reply.choices} == {"length"}
    assert reply.usage.completion_tokens == 12

    messages = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(model=tiny_llama_dir.name, messages=messages, n=2,
                                          max_tokens=3,
                                          extra_body={"use_beam_search": True,
                                                      "ignore_eos": True})
    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01) as llm:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        ids = llm.tokenizer(text, add_special_tokens=False).input_ids
        [expected] = llm.beam_search([ids], BeamSearchParams(beam_width=2, max_tokens=3,
                                                             ignore_eos=True))
    assert [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)] == \
        [beam.text for beam in expected.sequences]


def test_malformed_json_and_unknown_model(stack):
    status, reply = post(stack, "/v1/completions", b"{not json")
    assert status == 400 and reply["error"]["message"]
    status, reply = post(stack, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and reply["error"]["param"] == "model"


def test_a_disconnected_stream_frees_its_blocks(stack, tiny_llama_dir):
    steps_before = stack.stats().num_steps
    request = urllib.request.Request(
        f"{stack}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": "the cat", "max_tokens": 200, "stream": True,
                         "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as reply:
        reply.readline()  # the first event arrived: the request is running
    stats = stack.wait_until_all_blocks_free()
    # Aborted, not run to the end: 200 tokens would have taken about 200 steps.
    assert stats.num_steps - steps_before < 100


def test_grpc_generate_matches_http_and_cancel_aborts(stack, client, tiny_llama_dir):
    from pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

    http = client.completions.create(model=tiny_llama_dir.name, prompt="the cat", max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    with grpc.insecure_channel(stack.grpc) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        replies = list(stub.Generate(generation_pb2.GenerateRequest(
            text="the cat", sampling=common_pb2.SamplingParams(
                temperature=0, max_tokens=10, ignore_eos=True)), timeout=60))
        assert "".join(c.text for r in replies for c in r.choices) == http.choices[0].text
        assert replies[-1].usage.completion_tokens == 10
        assert replies[-2].choices[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
        models = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10)
        assert models.models[0].model_id == tiny_llama_dir.name
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(generation_pb2.GenerateRequest(
                text="x", sampling=common_pb2.SamplingParams(top_p=2.0)), timeout=10))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.top_p" in error.value.details()

        steps_before = stack.stats().num_steps
        call = stub.Generate(generation_pb2.GenerateRequest(
            text="the cat", sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)),
            timeout=60)
        next(call)
        call.cancel()
    stats = stack.wait_until_all_blocks_free()
    assert stats.num_steps - steps_before < 100


def test_metrics_cover_gateway_and_scheduler(stack, client, tiny_llama_dir):
    client.completions.create(model=tiny_llama_dir.name, prompt="the cat", max_tokens=3,
                              temperature=0, extra_body={"ignore_eos": True})
    with urllib.request.urlopen(f"{stack}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for name in ("pagedserve_requests_running", "pagedserve_requests_waiting",
                 "pagedserve_kv_blocks_total", "pagedserve_kv_blocks_free",
                 "pagedserve_prefix_cache_queried_tokens_total",
                 "pagedserve_prefix_cache_hit_tokens_total", "pagedserve_preemptions_total",
                 "pagedserve_spec_decode_num_drafts_total",
                 "pagedserve_spec_decode_num_draft_tokens_total",
                 "pagedserve_spec_decode_num_accepted_tokens_total",
                 "pagedserve_prompt_tokens_total", "pagedserve_generation_tokens_total",
                 'pagedserve_requests_finished_total{finish_reason="length"}',
                 "pagedserve_time_to_first_token_seconds_bucket",
                 "pagedserve_inter_token_latency_seconds_bucket",
                 "pagedserve_e2e_request_latency_seconds_count"):
        assert name in text, name
    generated = next(line for line in text.splitlines()
                     if line.startswith("pagedserve_generation_tokens_total"))
    assert float(generated.split()[-1]) >= 3
    # What sizes the executor's memory: its weights, and a KV pool of total blocks x the bytes
    # of a block (2 layers x K and V x 16 tokens x 2 KV heads x 16 dims in the cache's dtype).
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    executor = next(name for name in samples if name.startswith("pagedserve_kv_blocks_total"))
    label = executor.removeprefix("pagedserve_kv_blocks_total")
    info = next(name for name in samples if name.startswith("pagedserve_executor_info"))
    assert 'quantization="none"' in info and samples[info] == 1
    itemsize = 2 if 'kv_cache_dtype="bfloat16"' in info else 4
    assert 'kv_cache_dtype="float32"' in info or itemsize == 2
    assert samples["pagedserve_kv_cache_bytes" + label] == \
        samples[executor] * 2 * 2 * 16 * 2 * 16 * itemsize
    assert samples["pagedserve_weight_bytes" + label] > 0


def test_scheduler_unreachable_is_503_at_once(tmp_path):
    http, grpc_port, dead = free_ports(3)
    log = (tmp_path / "gateway.log").open("w")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "gateway", "--http-port", str(http),
         "--grpc-port", str(grpc_port), "--scheduler-address", f"127.0.0.1:{dead}"],
        stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_until_answers(f"{base}/health", 60, gateway)
        started = time.monotonic()
        status, reply = post(base, "/v1/completions", {"prompt": "hello"})
        assert status == 503 and "unreachable" in reply["error"]["message"]
        assert time.monotonic() - started < 5
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{base}/ready", timeout=5)
        assert error.value.code == 503
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


def test_default_model_chat_matches_transformers(default_model, default_model_float, tmp_path):
    """The embedded SmolLM2 through `up` (converted into this session's cache, its GGUF weights
    kept quantized) answers a chat greedily exactly as transformers does on their float32
    dequantization."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = AutoTokenizer.from_pretrained(default_model.path)
    model = AutoModelForCausalLM.from_pretrained(default_model_float.path, dtype=torch.float32)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    cache_dir = default_model.path.parent.parent
    with running_stack(tmp_path / "log", "--model-cache-dir", str(cache_dir),
                       "--kv-cache-gib", "0.5") as stack:
        client = openai.OpenAI(base_url=f"{stack}/v1", api_key="unused")
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                               messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected


def test_a_non_streamed_request_whose_client_left_is_aborted(stack):
    steps_before = stack.stats().num_steps
    body = json.dumps({"prompt": "the cat", "max_tokens": 200, "ignore_eos": True}).encode()
    host, port = stack.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 10
        while not stack.stats().num_running:  # wait until it generates, then hang up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    stats = stack.wait_until_all_blocks_free()
    # Alone, its 200 tokens take at least 200 steps; it was stopped well before.
    assert stats.num_steps - steps_before < 150


def test_echo_returns_the_prompt_and_its_logprobs_streamed_or_not(client, tiny_llama_dir):
    """OpenAI's echo: the prompt's text before the answer's, and with logprobs the prompt's
    tokens first (None for the first, which nothing predicts; then as transformers computes
    them), in the whole answer and in a stream's first chunk of each choice."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    fields = dict(model=tiny_llama_dir.name, prompt=prompt, max_tokens=3, temperature=0,
                  logprobs=2, echo=True, n=2)
    reply = client.completions.create(**fields)
    chunks = list(client.completions.create(**fields, stream=True))
    streamed = {i: [c.choices[0] for c in chunks if c.choices[0].index == i] for i in (0, 1)}
    for choice, parts in zip(reply.choices, streamed.values(), strict=True):
        assert choice.text.startswith(tokenizer.decode(prompt))
        assert "".join(p.text for p in parts) == choice.text
        logprobs = choice.logprobs
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert len(logprobs.tokens) == len(prompt) + 3
        for position in range(1, len(prompt)):
            assert logprobs.token_logprobs[position] == pytest.approx(
                float(expected[position - 1, prompt[position]]), abs=1e-4)
            assert len(logprobs.top_logprobs[position]) <= 2
        first = parts[0].logprobs
        assert first.tokens[:len(prompt)] == logprobs.tokens[:len(prompt)]
        assert first.token_logprobs[1:len(prompt)] == pytest.approx(
            logprobs.token_logprobs[1:len(prompt)], abs=1e-6)
