"""Tensor parallelism: a model split over two ranks (two processes joined by gloo on the CPU)
generates what `transformers` generates on the whole model, for every family and its attention
layout (GQA with KV heads split, multi-query with the KV head replicated, biases, tied and
untied heads, a vocabulary the ranks do not divide); sampling, forks and prefix sharing agree
with one rank; the layers' slices sum to the whole layer; the errors name the flag; and the
group lives and dies as one executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.entrypoints.offline import LLM
from pagedserve.executor.models import check_tensor_parallel
from pagedserve.executor.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pagedserve.executor.parallel import TensorParallel, TensorParallelError
from pagedserve.executor.tp_group import Followers
from pagedserve.kernels import cpu_kernels
from pagedserve.kernels.quantization import quantize_int8
from pagedserve.runtime.internal_auth import Role
from pagedserve.runtime.serving import StartupError
from pagedserve.scheduler.executor_handle import GrpcExecutorHandle
from pagedserve.testing.processes import internal_auth, start_executor
from pagedserve.testing.tiny_models import (
    byte_level_tokenizer,
    save_tiny_model,
    tiny_falcon_config,
    tiny_gemma2_config,
    tiny_gemma3_config,
    tiny_gpt2_config,
    tiny_gpt_neox_config,
    tiny_llama_config,
    tiny_mistral_config,
    tiny_mixtral_config,
    tiny_phi3_config,
    tiny_qwen2_config,
    tiny_qwen2_moe_config,
    tiny_qwen3_config,
    tiny_qwen3_moe_config,
)
from pagedserve.v1 import common_pb2

# 301: a vocabulary two ranks do not divide (the last rank's rows are padding).
VOCAB = 301
VARIANTS = {
    "llama-gqa-kv-split": lambda: tiny_llama_config(VOCAB, tie_word_embeddings=False),
    "qwen2-bias-tied": lambda: tiny_qwen2_config(VOCAB),
    "qwen3-qk-norm": lambda: tiny_qwen3_config(VOCAB),
    "mistral-window": lambda: tiny_mistral_config(VOCAB, sliding_window=8),
    "gpt-neox-parallel-residual": lambda: tiny_gpt_neox_config(VOCAB),
    "gpt2-learned-positions": lambda: tiny_gpt2_config(VOCAB),
    "phi3-fused-qkv-gate-up": lambda: tiny_phi3_config(VOCAB),
    "mixtral-experts-split": lambda: tiny_mixtral_config(VOCAB),
    "qwen2-moe-shared-expert": lambda: tiny_qwen2_moe_config(VOCAB),
    "qwen3-moe-qk-norm-renormalised": lambda: tiny_qwen3_moe_config(VOCAB),
    "gemma2-capped-windowed": lambda: tiny_gemma2_config(VOCAB),
    "gemma3-two-rope-tables": lambda: tiny_gemma3_config(VOCAB),
    "falcon-multi-query-kv-replicated": lambda: tiny_falcon_config(
        VOCAB, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=True),
}
PROMPTS = [[5], [7, 8, 9], list(range(20, 33)), list(range(40, 60))]
MAX_TOKENS = 8
ENGINE = dict(dtype="float32", kv_cache_gib=0.01, max_model_len=128)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            directory = save_tiny_model(tmp_path_factory.mktemp(variant), VARIANTS[variant]())
            byte_level_tokenizer().save_pretrained(directory)  # the engine decodes its text
            cache[variant] = directory
        return cache[variant]
    return get


def greedy(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                     logprobs=2, **fields)


def references(directory, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and their logprobs on the whole model, for each prompt (the
    model loaded once)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS,
                                    min_new_tokens=MAX_TOKENS, do_sample=False)[0]
            logprobs = model(tokens[None]).logits[0].log_softmax(-1)
            new = tokens[len(prompt):]
            results.append((new.tolist(), logprobs[len(prompt) - 1:-1].gather(
                -1, new[:, None])[:, 0].tolist()))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_generate_what_transformers_does(model_dirs, variant):
    directory = model_dirs(variant)
    with LLM(str(directory), tensor_parallel_size=2, **ENGINE) as llm:
        outputs = llm.generate(PROMPTS, greedy(prompt_logprobs=1))
    with LLM(str(directory), **ENGINE) as single:
        single_outputs = single.generate(PROMPTS, greedy(prompt_logprobs=1))
    for (tokens, logprobs), output, single_output in zip(references(directory, PROMPTS), outputs,
                                                         single_outputs, strict=True):
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        assert [lp.chosen.logprob for lp in completion.logprobs] == pytest.approx(logprobs,
                                                                                  abs=1e-4)
        # The top-2 lists come from the gathered logits: the same as one rank's.
        assert [[t.token_id for t in lp.top] for lp in completion.logprobs] == \
            [[t.token_id for t in lp.top] for lp in single_output.outputs[0].logprobs]
        assert [lp.chosen.logprob for lp in output.prompt_logprobs[1:]] == pytest.approx(
            [lp.chosen.logprob for lp in single_output.prompt_logprobs[1:]], abs=1e-4)


@pytest.mark.slow
def test_the_default_model_on_three_ranks_matches_one(default_model):
    """The embedded SmolLM2 (9 heads and 3 KV heads: 3 ranks; a tied 49,152-row vocabulary)
    from its converted GGUF: the same greedy text and logprobs on three ranks as on one.
    Logprobs within 1e-4 where the 4-bit layers multiply float32 x; within 5e-3 where they
    round x to 16-bit integers (`int16_activations`, AVX2 CPUs): three ranks sum a row-parallel
    layer's output in another order, and the float32 ulps that moves x by put a few of its
    values on the other side of a rounding boundary (a step of 2^-15 of their group's
    largest), layer after layer (1.3e-3 measured on a 2-core AVX2 EPYC)."""
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = common_pb2.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
    runs = []
    for size in (1, 3):
        with LLM(str(default_model.path), tensor_parallel_size=size, dtype="float32",
                 kv_cache_gib=0.1, max_model_len=256) as llm:
            runs.append([o.outputs[0] for o in llm.generate(prompts, params)])
    (single, split) = runs
    assert [c.text for c in split] == [c.text for c in single]
    tolerance = 5e-3 if cpu_kernels.int16_activations_supported() else 1e-4
    assert [lp.chosen.logprob for c in split for lp in c.logprobs] == pytest.approx(
        [lp.chosen.logprob for c in single for lp in c.logprobs], abs=tolerance)


@pytest.mark.slow
def test_sampling_forks_and_shared_prefixes_agree_with_one_rank(model_dirs):
    """Seeded sampling with n = 2 (a fork: block copies on every rank), repetition penalties,
    and prompts sharing a cached prefix: the same tokens on two ranks as on one."""
    directory = model_dirs("llama-gqa-kv-split")
    prefix = list(range(100, 140))
    prompts = [prefix + [1, 2], prefix + [3], prefix + [4, 5, 6]]
    params = common_pb2.SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, n=2,
                                       repetition_penalty=1.2, ignore_eos=True)
    results = {}
    for size in (1, 2):
        with LLM(str(directory), tensor_parallel_size=size, **ENGINE) as llm:
            llm.generate(prompts[:1], params)  # caches the prefix
            outputs = llm.generate(prompts, params)
        assert all(o.num_cached_tokens >= 32 for o in outputs)
        results[size] = [[c.token_ids for c in o.outputs] for o in outputs]
    assert results[2] == results[1]
    assert all(a != b for a, b in results[2])  # the two samples of a prompt differ


# -- the layers' slices, without a process group ------------------------------------------


@dataclass(frozen=True)
class HandReduced(TensorParallel):
    """A rank without a process group: its all-reduce keeps a copy of the partial sum and hands
    it back unreduced, for the test to add up (the all-reduce, done by hand)."""

    partials: list[torch.Tensor] = field(default_factory=list, compare=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.partials.append(x.clone())
        return x


def test_column_and_row_slices_sum_to_the_whole_layer():
    """Two ranks' column-parallel outputs concatenate, and their row-parallel partial sums add
    up, to the whole layer's output: the layers' forward on each rank, the all-reduce done by
    hand between them."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64)
    q, k, v = (torch.randn(rows, 8, dtype=torch.float64) for rows in (8, 2, 2))  # 4, 1, 1 heads
    down, bias = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    column_weights, column_outputs, row_outputs, ranks = [], [], [], []
    for rank in range(2):
        tp = HandReduced(rank=rank, size=2)
        ranks.append(tp)
        # One KV head for two ranks: replicated (pieces = 1).
        qkv = ColumnParallelLinear(8, [8, 2, 2], False, torch.float64, tp, [2, 1, 1])
        for part, tensor in enumerate((q, k, v)):
            qkv.load_part(part, "weight", tensor)
        column_weights.append(qkv.weight.data)
        column_outputs.append(qkv(x))
        row = RowParallelLinear(8, [5], True, torch.float64, tp)
        row.load_part(0, "weight", down)
        row.load_part(0, "bias", bias)
        assert torch.equal(row.bias, bias)  # whole on every rank, added once after the sum
        row_outputs.append(row(x[:, rank * 4:(rank + 1) * 4]))
    assert torch.equal(column_weights[0], torch.cat([q[:4], k, v]))
    assert torch.equal(column_weights[1], torch.cat([q[4:], k, v]))
    # Each rank's output is its query heads and the replicated KV head; the query halves
    # concatenate to the whole projection.
    assert torch.allclose(column_outputs[0], x @ torch.cat([q[:4], k, v]).T)
    assert torch.allclose(column_outputs[1], x @ torch.cat([q[4:], k, v]).T)
    assert torch.allclose(torch.cat([out[:, :4] for out in column_outputs], dim=-1), x @ q.T)
    # One all-reduce per rank; the partial sums add up to the whole layer, and each rank's
    # output is the reduced sum plus the bias, added once after it.
    (first,), (second,) = (tp.partials for tp in ranks)
    assert torch.allclose(first + second + bias, x @ down.T + bias)
    for output, partial in zip(row_outputs, (first, second), strict=True):
        assert torch.allclose(output, partial + bias)


def test_each_rank_quantizes_its_own_slice():
    """Under --quantization, a row-parallel rank's int8 weight is its column slice quantized on
    its own (scales over the rank's columns), and the ranks' partial sums still add up to the
    layer on their dequantized slices."""
    torch.manual_seed(2)
    x = torch.randn(3, 8)
    weight = torch.randn(5, 8) * torch.tensor([1.0] * 4 + [10.0] * 4)  # unequal halves
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(8, [5], False, torch.float32,
                                  TensorParallel(rank=rank, size=2), reduce=False)
        layer.load_part(0, "weight", weight)
        layer.quantize("int8", shared=False)
        columns = weight[:, rank * 4:(rank + 1) * 4]
        expected = quantize_int8(columns, dynamic_activations=False)
        assert torch.equal(layer.quantized.qweight, expected.qweight)
        assert torch.equal(layer.quantized.scales, expected.scales)
        total = total + layer(x[:, rank * 4:(rank + 1) * 4])
    halves = [quantize_int8(weight[:, half], False).dequantized(torch.float32)
              for half in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(total, x @ torch.cat(halves, dim=1).T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_serve_int8_weights_and_an_fp8_cache(model_dirs):
    """Both options pass to the followers: two ranks score the prompts as one rank does under
    the same options, to the int8 rounding (each rank's row-parallel scales cover its own
    columns, so not exactly; greedy tokens are not compared, as near ties of the tiny random
    model may go either way)."""
    directory = model_dirs("llama-gqa-kv-split")
    runs = []
    for size in (1, 2):
        with LLM(str(directory), tensor_parallel_size=size, quantization="int8",
                 kv_cache_dtype="fp8", **ENGINE) as llm:
            outputs = llm.generate(PROMPTS[1:], common_pb2.SamplingParams(
                max_tokens=1, temperature=0, prompt_logprobs=1))
            runs.append([lp.chosen.logprob for o in outputs for lp in o.prompt_logprobs[1:]])
    single, split = runs
    assert len(split) == sum(len(p) - 1 for p in PROMPTS[1:])
    assert split == pytest.approx(single, rel=2e-2)  # measured: 0.7% at most
    assert split != single  # the per-rank scales do change the numbers


def test_unreduced_row_slices_carry_the_bias_once():
    """A row-parallel layer whose caller reduces (a parallel-residual layer sums attention and
    MLP first): the ranks' outputs add up to the whole layer, bias included once."""
    torch.manual_seed(1)
    x = torch.randn(3, 8, dtype=torch.float64)
    weight, bias = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    total = 0
    for rank in range(2):
        layer = RowParallelLinear(8, [5], True, torch.float64,
                                  TensorParallel(rank=rank, size=2), reduce=False)
        layer.load_part(0, "weight", weight)
        layer.load_part(0, "bias", bias)
        total = total + layer(x[:, rank * 4:(rank + 1) * 4])
    assert torch.allclose(total, x @ weight.T + bias)


def test_vocabulary_slices_pad_the_last_rank():
    weight = torch.randn(5, 4)
    slices = []
    for rank in range(2):
        tp = TensorParallel(rank=rank, size=2)
        embedding = VocabParallelEmbedding(5, 4, torch.float32, tp)
        embedding.load_part(0, "weight", weight)
        head = ParallelLMHead(4, 5, torch.float32, tp)
        head.load_part(0, "weight", weight)
        assert torch.equal(head.weight, embedding.weight)
        slices.append(embedding.weight.data)
    assert torch.equal(slices[0], weight[:3])
    assert torch.equal(slices[1], torch.cat([weight[3:], torch.zeros(1, 4)]))


def test_a_misshapen_checkpoint_tensor_is_refused_whole():
    layer = RowParallelLinear(8, [5], False, torch.float32, TensorParallel(rank=0, size=2))
    with pytest.raises(ValueError, match=r"checkpoint shape \(5, 4\), model expects \(5, 8\)"):
        layer.load_part(0, "weight", torch.zeros(5, 4))


@pytest.mark.parametrize("heads, kv_heads, size, expected", [
    (8, 8, 2, (4, 4, 2)), (8, 2, 4, (2, 1, 2)), (8, 1, 4, (2, 1, 1)), (4, 4, 4, (1, 1, 4))])
def test_head_splits(heads, kv_heads, size, expected):
    split = TensorParallel(size=size).split_heads(heads, kv_heads)
    assert (split.num_heads, split.num_kv_heads, split.kv_pieces) == expected


# -- errors ---------------------------------------------------------------------------------


def _no_follower_may_start(*args, **kwargs):
    raise AssertionError("a tensor-parallel rank was started")


def test_sizes_the_model_cannot_take_are_refused_before_anything_starts(model_dirs,
                                                                         monkeypatch):
    directory = model_dirs("llama-gqa-kv-split")  # 4 query heads, 2 KV heads
    with pytest.raises(TensorParallelError, match=r"attention heads \(4\).*tensor-parallel-size 3"):
        check_tensor_parallel(directory, 3)
    with pytest.raises(TensorParallelError, match=r"KV heads \(3\)"):
        TensorParallel(size=2).split_heads(6, 3)
    # Refused before any rank is started: starting one here fails the test.
    monkeypatch.setattr(Followers, "start", _no_follower_may_start)
    with pytest.raises(StartupError, match="--tensor-parallel-size: the number of attention"):
        LLM(str(directory), tensor_parallel_size=3, **ENGINE)
    with pytest.raises(StartupError, match="--tensor-parallel-size must be at least 1, got 0"):
        LLM(str(directory), tensor_parallel_size=0, **ENGINE)


# -- the group as one executor ---------------------------------------------------------------


def _followers(pid: int) -> list[int]:
    """The child processes of `pid` (started by any of its threads)."""
    return [child.pid for child in psutil.Process(pid).children()]


def _wait_gone(pid: int, timeout: float) -> None:
    """Waits for `pid` to exit; a zombie counts as gone (its parent, rank 0, may have exited
    and left it to a reaper that does not reap)."""
    deadline = time.monotonic() + timeout
    try:
        process = psutil.Process(pid)
        while process.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() >= deadline:
                raise AssertionError(f"process {pid} still runs after {timeout} s")
            time.sleep(0.1)
    except psutil.NoSuchProcess:
        pass


@pytest.mark.slow
def test_a_two_rank_executor_serves_the_scheduler_and_stops_as_one(model_dirs, tmp_path):
    directory = model_dirs("gpt-neox-parallel-residual")
    log = tmp_path / "executor.log"
    process, address, description = start_executor(
        directory, log, "--tensor-parallel-size=2", "--kv-cache-gib=0.01", "--max-model-len=128")
    try:
        assert description.parallel.tensor_parallel_size == 2
        (follower,) = _followers(process.pid)
        llm = LLM.__new__(LLM)
        auth = internal_auth(Role.SCHEDULER)
        llm._attach(directory, description, lambda: GrpcExecutorHandle(address, auth=auth),
                    enable_prefix_caching=True, overlap=True)
        outputs = llm.generate(PROMPTS, greedy())
        for output, (tokens, _) in zip(outputs, references(directory, PROMPTS), strict=True):
            assert output.outputs[0].token_ids == tokens
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
        _wait_gone(follower, timeout=15)
    finally:
        process.kill()


@pytest.mark.slow
def test_a_dead_follower_takes_the_executor_down(model_dirs, tmp_path):
    directory = model_dirs("llama-gqa-kv-split")
    log = tmp_path / "executor.log"
    process, _, _ = start_executor(directory, log, "--tensor-parallel-size=2",
                                   "--kv-cache-gib=0.01", "--max-model-len=128")
    try:
        (follower,) = _followers(process.pid)
        os.kill(follower, signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        assert '"a tensor-parallel rank exited' in log.read_text()
        assert '"rank": 1' in log.read_text()
    finally:
        process.kill()


FAILING_RANK_0 = """
import sys
from pagedserve.entrypoints.offline import LLM
from pagedserve.v1.common_pb2 import SamplingParams

llm = LLM(sys.argv[1], tensor_parallel_size=2, dtype="float32", kv_cache_gib=0.01,
          max_model_len=128)
print("follower pid", llm._runner.group.followers.processes[0].pid, flush=True)

def broken(*args):
    raise RuntimeError("injected failure on rank 0")

llm._runner.model.compute_logits = broken
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4))
print("generate returned", flush=True)
"""


@pytest.mark.slow
def test_a_step_failing_on_rank_0_stops_the_group(model_dirs):
    """Rank 0 fails between collectives (the follower is left waiting in the logits gather):
    the process exits 1 at once, naming the failure, and the follower goes with it."""
    directory = model_dirs("llama-gqa-kv-split")
    done = subprocess.run([sys.executable, "-c", FAILING_RANK_0, str(directory)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "generate returned" not in done.stdout
    assert "injected failure on rank 0" in done.stderr + done.stdout
    assert "the tensor-parallel group cannot go on" in done.stderr + done.stdout
    (pid_line,) = [line for line in done.stdout.splitlines() if "follower pid" in line]
    _wait_gone(int(pid_line.split()[-1]), timeout=15)
