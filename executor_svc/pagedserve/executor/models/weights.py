"""Loading Hugging Face safetensors checkpoints (single file or sharded) into our models."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.executor.models.layers import (
    INPUT_ORDER,
    QUANTIZATION_TENSORS,
    Linear,
    PagedAttention,
    split_grouped_qkv,
)

# A model's hook from one checkpoint tensor to the (name, tensor) pairs it loads: the same pair,
# a rename, a fused tensor split into its projections, or none for a tensor the model ignores.
TensorTransform = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


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


def split_fused_qkv(name: str, tensor: torch.Tensor, num_kv_heads: int, head_dim: int,
                    parts: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"),
                    ) -> list[tuple[str, torch.Tensor]]:
    """`<parent>.<fused>.<weight|bias>` laid out per KV head (see `split_grouped_qkv`) ->
    `<parent>.q_proj.<param>`, `<parent>.k_proj.<param>`, `<parent>.v_proj.<param>`, which
    the model's PACKED_MODULES then place into the slices of its packed Linear."""
    module_path, _, param_name = name.rpartition(".")
    parent = module_path.rpartition(".")[0]
    try:
        tensors = split_grouped_qkv(tensor, num_kv_heads, head_dim)
    except ValueError as exc:
        raise WeightLoadError(f"{name}: {exc}") from None
    return [(f"{parent}.{part}.{param_name}", t) for part, t in zip(parts, tensors, strict=True)]


# A calibrated checkpoint's KV cache scales (llm-compressor writes them under the attention
# module: `<layer>.self_attn.k_scale`), one float each.
KV_SCALES = ("k_scale", "v_scale")


def kv_scale_targets(module_path: str, param_name: str) -> list[tuple[str, str]]:
    """The (attention module, `k_scale` or `v_scale`) pairs a checkpoint tensor sets; [] for a
    tensor that is no KV cache scale. Older spellings, as vLLM reads them: one `kv_scale` for
    both (AutoFP8), and the K and V projections' `output_scale` (older llm-compressor) or
    `k_scale` / `v_scale` under them (ModelOpt)."""
    parent, _, projection = module_path.rpartition(".")
    scale = {"k_proj": "k_scale", "v_proj": "v_scale"}.get(projection)
    if scale is not None and param_name in ("output_scale", scale):
        return [(parent, scale)]
    if param_name in KV_SCALES:
        return [(module_path, param_name)]
    if param_name == "kv_scale":
        return [(module_path, name) for name in KV_SCALES]
    return []


def _load_kv_scale(model: nn.Module, module_path: str, param_name: str, name: str,
                   tensor: torch.Tensor) -> None:
    """The scale into the one PagedAttention under `module_path`: a positive finite scalar."""
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise WeightLoadError(f"unexpected tensor in checkpoint: {name}") from None
    attention = [m for m in module.modules() if isinstance(m, PagedAttention)]
    if len(attention) != 1:
        raise WeightLoadError(f"unexpected tensor in checkpoint: {name} (not under one "
                              "attention layer)")
    value = float(tensor.reshape(-1)[0]) if tensor.numel() == 1 else math.nan
    if not (math.isfinite(value) and value > 0):
        raise WeightLoadError(f"{name}: a KV cache scale must be one positive finite number, "
                              f"got shape {tuple(tensor.shape)} {tensor.flatten()[:4].tolist()}")
    setattr(attention[0], f"checkpoint_{param_name}", value)


def load_checkpoint(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                    packed_modules: dict[str, tuple[str, int]],
                    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",),
                    transform: TensorTransform | None = None) -> None:
    """Copy checkpoint tensors into `model` by name. `transform` (the model's
    `checkpoint_tensors`, where it has one) first maps each checkpoint tensor to the pairs the
    model takes. A projection listed in `packed_modules` goes into its slice of the packed
    Linear; every parameter must be loaded exactly once, and a Linear that loaded an int8
    weight (a quantized checkpoint) its `weight_scale` too (and `weight_offset` where the
    format has one: it is optional). A checkpoint tensor naming a tied
    parameter under its second name (a tied head stored anyway) is skipped."""
    params = dict(model.named_parameters())  # tied weights appear once, under the first name
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    loaded: set[str] = set()
    for checkpoint_name, checkpoint_tensor in weights:
        if checkpoint_name.endswith(ignored_suffixes):
            continue
        pairs = (transform(checkpoint_name, checkpoint_tensor) if transform is not None
                 else [(checkpoint_name, checkpoint_tensor)])
        for name, tensor in pairs:
            _load_tensor(model, params, aliases, packed_modules, name, tensor, loaded)
    expected = set()
    for name in params:
        module_path, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_path)
        names = [name]
        if isinstance(module, Linear) and module.quantized is not None and param_name == "weight":
            names.append(f"{module_path}.weight_scale")
        if isinstance(module, Linear) and len(module.part_sizes) > 1:
            expected.update(f"{n}#{part}" for n in names for part in range(len(module.part_sizes)))
        else:
            expected.update(names)
    missing = sorted(expected - loaded)
    if missing:
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _load_tensor(model: nn.Module, params: dict[str, nn.Parameter], aliases: set[str],
                 packed_modules: dict[str, tuple[str, int]], name: str, tensor: torch.Tensor,
                 loaded: set[str]) -> None:
    module_path, _, param_name = name.rpartition(".")
    kv_scales = kv_scale_targets(module_path, param_name)
    for attention_path, scale in kv_scales:
        _load_kv_scale(model, attention_path, scale, name, tensor)
    if kv_scales:
        return
    parent, _, leaf = module_path.rpartition(".")
    if leaf in packed_modules:
        packed, part = packed_modules[leaf]
        target_path = f"{parent}.{packed}" if parent else packed
        try:
            module = model.get_submodule(target_path)
        except AttributeError:
            raise WeightLoadError(f"unexpected tensor in checkpoint: {name}") from None
        assert isinstance(module, Linear)
        try:
            with torch.no_grad():
                module.load_part(part, param_name, tensor)
        except ValueError as exc:
            raise WeightLoadError(f"{name}: {exc}") from None
        loaded.add(f"{target_path}.{param_name}#{part}")
        return
    if name not in params and not (param_name in (*QUANTIZATION_TENSORS, INPUT_ORDER)
                                   and f"{module_path}.weight" in params):
        if name in aliases:
            return  # a tied parameter's second name: loaded under its first
        raise WeightLoadError(f"unexpected tensor in checkpoint: {name}")
    module = model.get_submodule(module_path)
    if hasattr(module, "load_part"):  # a layer that keeps its tensor-parallel slice
        try:
            with torch.no_grad():
                module.load_part(0, param_name, tensor)
        except ValueError as exc:
            raise WeightLoadError(f"{name}: {exc}") from None
    elif params[name].shape != tensor.shape:
        raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model "
                              f"expects {tuple(params[name].shape)}")
    else:
        with torch.no_grad():
            params[name].copy_(tensor)
    loaded.add(name)
