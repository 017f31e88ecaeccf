"""Checkpoint loading: sharded safetensors, compute dtypes, and clear errors for checkpoints
that do not match the model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pagedserve.executor.models import load_model
from pagedserve.executor.models.weights import WeightLoadError
from pagedserve.testing.tiny_models import save_tiny_llama


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = save_tiny_llama(tmp_path / "single")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(single, torch.float32), load_model(sharded, torch.float32)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_bfloat16_weights_are_the_rounded_float32_ones(tmp_path):
    directory = save_tiny_llama(tmp_path / "m")
    full, half = load_model(directory, torch.float32), load_model(directory, torch.bfloat16)
    for (name, p32), (_, p16) in zip(full.state_dict().items(), half.state_dict().items(),
                                     strict=True):
        assert p16.dtype == torch.bfloat16, name
        torch.testing.assert_close(p16, p32.to(torch.bfloat16), rtol=0, atol=0, msg=name)


def _rewrite_checkpoint(directory, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.norm.weight"), "checkpoint lacks 1 tensors"),
    (lambda t: t.update({"model.extra.weight": torch.zeros(1)}),
     "unexpected tensor in checkpoint: model.extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(3)}),
     r"model.norm.weight: checkpoint shape \(3,\), model expects \(64,\)"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(5, 64)}),
     r"weight part 1: checkpoint shape \(5, 64\)"),
])
def test_mismatched_checkpoints_are_clear_errors(tmp_path, edit, message):
    directory = save_tiny_llama(tmp_path / "m")
    _rewrite_checkpoint(directory, edit)
    with pytest.raises((WeightLoadError, ValueError), match=message):
        load_model(directory, torch.float32)
