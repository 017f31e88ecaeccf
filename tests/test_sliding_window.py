"""Sliding-window memory through the whole engine: an executor whose every attention layer is
windowed says so (KvCacheInfo.sliding_window), its scheduler releases each sequence's blocks
that fall behind the window while it runs, the freed blocks go to other sequences, and every
token is still transformers' (greedy, float32, on the cpu and triton kernel sets, which read
only the window). Where some layer attends to every position, nothing is released."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.entrypoints.offline import LLM
from pagedserve.executor.models.layers import attention_window
from pagedserve.testing.tiny_models import (
    byte_level_tokenizer,
    save_tiny_model,
    tiny_gemma2_config,
    tiny_mistral_config,
    tiny_qwen2_config,
)
from pagedserve.v1 import common_pb2

VOCAB = 300
PROMPTS = [list(range(20, 25)), list(range(40, 52)), list(range(60, 80)), [7, 8]]
NEW_TOKENS = 40
# About 26 blocks of 4 tokens: the four sequences need 60 without the window, 16 with it.
ENGINE = dict(dtype="float32", block_size=4, kv_cache_gib=0.00005, max_model_len=64)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("mistral"),
                                tiny_mistral_config(VOCAB, sliding_window=8,
                                                    max_position_embeddings=64))
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def _greedy_reference(directory, prompt):
    """transformers' greedy continuation, one full forward per token (no cache)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_released_blocks_change_no_token(mistral_dir, backend):
    greedy = common_pb2.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(str(mistral_dir), attention_backend=backend, **ENGINE) as llm:
        assert llm.blocks.sliding_window == 8
        assert llm.blocks.num_blocks < 4 * (20 + NEW_TOKENS) // 4  # too few to hold them all
        outputs = llm.generate(PROMPTS, greedy)
        assert llm.scheduler.counters.preemptions == 0  # each held a window's worth
        assert llm.blocks.num_used_blocks == 0
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert list(output.outputs[0].token_ids) == _greedy_reference(mistral_dir, prompt)


def test_without_the_window_the_same_pool_preempts(mistral_dir, tmp_path):
    """The same model with its window off (full attention): the pool runs out."""
    import json
    import shutil

    directory = shutil.copytree(mistral_dir, tmp_path / "full")
    config = json.loads((directory / "config.json").read_text())
    config["sliding_window"] = None
    (directory / "config.json").write_text(json.dumps(config))
    greedy = common_pb2.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(str(directory), **ENGINE) as llm:
        assert llm.blocks.sliding_window is None
        llm.generate(PROMPTS, greedy)
        assert llm.scheduler.counters.preemptions > 0


@pytest.mark.parametrize("config, window", [
    (tiny_mistral_config(VOCAB, sliding_window=8), 8),
    (tiny_mistral_config(VOCAB, sliding_window=None), 0),
    # Layer 0 full, layer 1 windowed: the full layer needs every block.
    (tiny_qwen2_config(VOCAB, use_sliding_window=True), 0),
    # Gemma 2's alternating layers likewise.
    (tiny_gemma2_config(VOCAB), 0),
])
def test_the_window_an_executor_describes(config, window):
    from pagedserve.executor.models import model_class

    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = model_class(config.architectures)(config, torch.float32)
    assert attention_window(model) == window
    # A draft without a window keeps every block of the pair.
    full = tiny_mistral_config(VOCAB, sliding_window=None, architectures=["MistralForCausalLM"])
    assert attention_window(model, model_class(full.architectures)(full, torch.float32)) == 0


def test_the_memory_benchmark_runs_and_finds_the_gain(tmp_path):
    """benchmarks/bench_sliding_window.py --quick (the figures of docs/performance.md come from
    its full run): both modes finish the workload; with the window a sequence holds a window's
    worth of blocks and nothing is preempted."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / \
        "bench_sliding_window.py"
    out = tmp_path / "window.json"
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    full, windowed = json.loads(out.read_text())["rows"]
    assert windowed["peak_blocks_per_sequence"] <= 128 // 16 + 2 < full["peak_blocks_per_sequence"]
    assert windowed["preemptions"] == 0 < full["preemptions"]
