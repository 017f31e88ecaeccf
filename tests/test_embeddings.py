"""/v1/embeddings (docs/embeddings.md): the stock `openai` client's embeddings, float and base64,
text and token ids, against the model's final hidden states as transformers computes them,
pooled by the last token or the mean, normalized or not; through chunked prefill and the prefix
cache (which a mean must not use); the flag's and the request's refusals."""

import asyncio
import base64
import json

import numpy as np
import openai
import pytest
import torch

from pagedserve.gateway.policy import pooling_config
from pagedserve.runtime.serving import StartupError
from pagedserve.v1 import common_pb2

TEXTS = ["the cat in a hat", "a much longer text, of more than sixteen tokens, which the "
         "scheduler computes in chunks of a few tokens each"]


def reference(model_dir, ids: list[int], pooling: str, normalize: bool) -> list[float]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0]
    vector = hidden[-1] if pooling == "LAST" else hidden.mean(dim=0)
    return (torch.nn.functional.normalize(vector, dim=0) if normalize else vector).tolist()


@pytest.fixture(scope="module", params=[("LAST", True), ("MEAN", False)],
                ids=["last-normalized", "mean"])
def served(request, tiny_llama_dir, tmp_path_factory):
    """A stack per pooling; 8 tokens per step, so the longer text is computed in chunks."""
    from pagedserve.testing.processes import running_stack

    pooling, normalize = request.param
    config = json.dumps({"pooling_type": pooling, "normalize": normalize})
    with running_stack(tmp_path_factory.mktemp("embed") / "log", "--model", str(tiny_llama_dir),
                       "--kv-cache-gib", "0.01", "--max-num-batched-tokens", "8",
                       "--pooler-config", config) as stack:
        with openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0) as client:
            yield pooling, normalize, client, stack


@pytest.mark.slow
def test_embeddings_are_the_pooled_hidden_states_of_transformers(served, tiny_llama_dir):
    from transformers import AutoTokenizer

    pooling, normalize, client, _ = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tokenizer(text).input_ids for text in TEXTS]
    expected = [reference(tiny_llama_dir, i, pooling, normalize) for i in ids]
    # Twice: the second time the prompts' blocks are cached (a mean computes them again).
    for _ in range(2):
        # Unset, the SDK asks for base64 and decodes it; "base64" asked for is left to us.
        for encoding in ("float", openai.NOT_GIVEN, "base64"):
            reply = client.embeddings.create(model=tiny_llama_dir.name, input=TEXTS,
                                             encoding_format=encoding)
            assert [d.index for d in reply.data] == [0, 1]
            for got, want in zip(reply.data, expected, strict=True):
                vector = got.embedding if encoding != "base64" \
                    else np.frombuffer(base64.b64decode(got.embedding), dtype="<f4").tolist()
                assert vector == pytest.approx(want, abs=2e-5)
            assert reply.usage.prompt_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=tiny_llama_dir.name, input=ids[1])
    assert by_ids.data[0].embedding == pytest.approx(expected[1], abs=2e-5)


@pytest.mark.slow
def test_bad_embedding_requests_are_400s_naming_the_field(served, tiny_llama_dir):
    _, _, client, _ = served
    for fields, param in (({"input": []}, "input"), ({"input": [[10**7]]}, "input"),
                          ({"input": "x", "dimensions": 8}, "dimensions"),
                          ({"input": [[5] * 300]}, "input")):
        with pytest.raises(openai.BadRequestError) as error:
            client.embeddings.create(model=tiny_llama_dir.name, **fields)
        assert error.value.body["param"] == param


@pytest.mark.parametrize("config", [None, {"pooling_type": "MEAN", "normalize": False}])
def test_the_offline_engine_embeds_as_transformers_pools(tiny_llama_dir, config):
    from transformers import AutoTokenizer

    from pagedserve.entrypoints.offline import LLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pooling, normalize = ("LAST", True) if config is None else ("MEAN", False)
    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache_gib=0.01,
             max_num_batched_tokens=8) as llm:
        vectors = llm.embed(TEXTS, config)
        assert llm.blocks.num_used_blocks == 0
    for vector, text in zip(vectors, TEXTS, strict=True):
        want = reference(tiny_llama_dir, tokenizer(text).input_ids, pooling, normalize)
        assert vector == pytest.approx(want, abs=2e-5)


@pytest.mark.parametrize("raw, expected", [
    (None, common_pb2.Pooling(type=common_pb2.Pooling.TYPE_LAST, normalize=True)),
    ('{"pooling_type": "MEAN"}', common_pb2.Pooling(type=common_pb2.Pooling.TYPE_MEAN,
                                                    normalize=True)),
    ('{"normalize": false}', common_pb2.Pooling(type=common_pb2.Pooling.TYPE_LAST)),
])
def test_the_pooler_config_flag(raw, expected):
    assert pooling_config(raw) == expected


@pytest.mark.parametrize("raw, says", [
    ("{", "not JSON"), ("[]", "JSON object"), ('{"pooling_type": "CLS"}', "pooling_type"),
    ('{"normalize": 1}', "normalize"), ('{"softmax": true}', "softmax"),
])
def test_a_pooler_config_that_cannot_be_honoured_stops_the_start(raw, says):
    with pytest.raises(StartupError, match=says):
        pooling_config(raw)


@pytest.mark.slow
def test_grpc_generate_returns_the_pooled_prompt_as_http_does(served, tiny_llama_dir):
    import grpc

    from pagedserve.v1 import generation_pb2, generation_pb2_grpc

    pooling, normalize, client, stack = served
    sampling = common_pb2.SamplingParams(max_tokens=2, pooling=common_pb2.Pooling(
        type=pooling_config(json.dumps({"pooling_type": pooling})).type, normalize=normalize))
    with grpc.insecure_channel(stack.grpc) as channel:
        replies = list(generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(model=tiny_llama_dir.name, text=TEXTS[0],
                                           sampling=sampling)))
    http = client.embeddings.create(model=tiny_llama_dir.name, input=TEXTS[0],
                                    encoding_format="float")
    assert list(replies[0].embedding) == pytest.approx(http.data[0].embedding, abs=1e-6)
    assert not any(r.embedding for r in replies[1:])
    for bad, field in ((common_pb2.SamplingParams(n=2, pooling=sampling.pooling),
                        "sampling.pooling"),
                       (common_pb2.SamplingParams(pooling=common_pb2.Pooling()),
                        "sampling.pooling.type")):
        with grpc.insecure_channel(stack.grpc) as channel, pytest.raises(grpc.RpcError) as error:
            list(generation_pb2_grpc.GenerationStub(channel).Generate(
                generation_pb2.GenerateRequest(model=tiny_llama_dir.name, text="x",
                                               sampling=bad)))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()


class OneRefused:
    """A scheduler whose second input is refused for overload while the first waits."""

    def __init__(self):
        from pagedserve.gateway.scheduler_client import ServedModel
        from pagedserve.testing.tiny_models import byte_level_tokenizer

        tokenizer = byte_level_tokenizer()
        self.served = ServedModel(common_pb2.ModelInfo(model_id="m", max_model_len=64,
                                                       vocab_size=len(tokenizer)), tokenizer,
                                  common_pb2.ExecutorLimits(max_logprobs=5))
        self.submits = []
        self.abandoned = False  # the waiting input's stream was closed

    async def model(self, name: str = ""):
        return self.served

    async def generate(self, submit, deadline):
        from pagedserve.gateway.errors import GatewayError

        self.submits.append(submit)
        if submit.request_id.endswith("-1"):
            raise GatewayError(429, "the queue is full", "rate_limit_error")
        try:
            await asyncio.sleep(60)
            yield
        finally:
            self.abandoned = True


def test_an_input_refused_ends_the_request_and_stops_the_other_inputs():
    import httpx2 as httpx

    from pagedserve.gateway.http_api import create_app

    async def run() -> tuple[httpx.Response, bool]:
        transport = httpx.ASGITransport(create_app(scheduler))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            reply = await client.post("/v1/embeddings", json={"input": ["a", "b"]})
        await asyncio.sleep(0.1)  # a cancelled input has closed its stream by now
        return reply, scheduler.abandoned  # read before asyncio.run cancels what is left

    scheduler = OneRefused()
    reply, abandoned = asyncio.run(run())
    assert reply.status_code == 429, reply.text
    assert abandoned
    assert all(s.sampling.pooling.type == common_pb2.Pooling.TYPE_LAST and
               s.sampling.pooling.normalize and s.sampling.max_tokens == 1
               for s in scheduler.submits)
