"""Loading Hugging Face safetensors checkpoints (single file or sharded) into our models."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from executor_svc.models.layers import Linear


class WeightLoadError(ValueError):
    """The checkpoint does not match the model (missing, unexpected or misshapen tensors)."""


def checkpoint_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{model_dir}: no *.safetensors checkpoint")
    return files


def iter_checkpoint(model_dir: pathlib.Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                    packed_modules: dict[str, tuple[str, int]],
                    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)) -> None:
    """Copy checkpoint tensors into `model` by name. A projection listed in `packed_modules`
    goes into its slice of the packed Linear; every parameter must be loaded exactly once."""
    params = dict(model.named_parameters())  # tied weights appear once, under the first name
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(ignored_suffixes):
            continue
        module_path, _, param_name = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in packed_modules:
            packed, part = packed_modules[leaf]
            target_path = f"{parent}.{packed}"
            module = model.get_submodule(target_path)
            assert isinstance(module, Linear)
            with torch.no_grad():
                module.load_part(part, param_name, tensor)
            loaded.add(f"{target_path}.{param_name}#{part}")
            continue
        if name not in params:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue  # some tied checkpoints also store the head
            raise WeightLoadError(f"unexpected tensor in checkpoint: {name}")
        if params[name].shape != tensor.shape:
            raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model "
                                  f"expects {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    expected = set()
    for name in params:
        module_path, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_path)
        if isinstance(module, Linear) and len(module.part_sizes) > 1:
            expected.update(f"{name}#{part}" for part in range(len(module.part_sizes)))
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
