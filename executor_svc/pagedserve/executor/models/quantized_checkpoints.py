"""Quantized checkpoints as the Hub ships them (docs/quantization.md): the method a config.json's
`quantization_config` names, read as vLLM reads it, and the tensors to reshape before they load.

Supported: compressed-tensors (the format llm-compressor writes) with int8 weights, symmetric,
one scale per output channel, and either no activation quantization (W8A16) or dynamic
per-token int8 activations (W8A8). These are exactly the two schemes of `--quantization`
(`int8`, `w8a8_int8`, kernels/pagedserve/kernels/quantization.py), so such a checkpoint loads
straight into the int8 form our own quantization makes and runs on the same kernels.

A GGUF converted in its native form (executor/gguf_to_hf.py) says `quant_method: "gguf"`:
its int8 values come with group scales and offsets, which the layers load as GroupedWeight.

Which layers are int8 is read from the tensors themselves: an int8 `weight` (with its
`weight_scale`) makes its Linear int8 (`Linear.checkpoint_int8`), a float one leaves it float.
That covers the config's `ignore` list (the LM head, typically) without matching its names,
which are transformers' module names, against ours. Anything else in a quantization_config
(another method, group scales, 4-bit, fp8, a KV cache scheme, sparsity) is refused at load,
naming the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.executor.models.layers import UnsupportedArchitectureError
from pagedserve.executor.models.weights import WeightLoadError

SUPPORTED = ("compressed-tensors with int8 weights per output channel, symmetric, and no "
             "activation quantization (W8A16) or dynamic per-token int8 activations (W8A8)")
# compressed-tensors formats of 8-bit int weights: int8 tensors as they are, or int8 values
# packed four to an int32 (pack-quantized).
FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
INT8_WEIGHTS = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True,
                "dynamic": False, "group_size": None}
INT8_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                          "dynamic": True}


@dataclass(frozen=True)
class CheckpointQuantization:
    """A quantized checkpoint's scheme, under its --quantization name."""

    scheme: str  # "int8" (W8A16), "w8a8_int8" or "gguf" (group scales, weight-only)

    @property
    def dynamic_activations(self) -> bool:
        return self.scheme == "w8a8_int8"


def checkpoint_quantization(config: Any) -> CheckpointQuantization | None:
    """The scheme of a transformers config's `quantization_config`; None without one. Raises
    UnsupportedArchitectureError naming the field that is not supported."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    method = quantization.get("quant_method")
    if method == "gguf":
        return CheckpointQuantization("gguf")
    if method != "compressed-tensors":
        _refuse(f"quantization_config.quant_method {method!r}")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if quantization.get(field):
            _refuse(f"quantization_config.{field}")
    groups = quantization.get("config_groups") or {}
    if not groups:
        _refuse("a quantization_config without config_groups")
    schemes = {_group_scheme(f"quantization_config.config_groups.{name}", group,
                             quantization.get("format")) for name, group in groups.items()}
    if len(schemes) > 1:
        _refuse(f"config groups of different schemes ({', '.join(sorted(schemes))})")
    return CheckpointQuantization(schemes.pop())


def _group_scheme(where: str, group: dict, default_format: str | None) -> str:
    fmt = group.get("format") or default_format
    if fmt not in FORMATS:
        _refuse(f"{where}.format {fmt!r}")
    _expect(f"{where}.weights", group.get("weights") or {}, INT8_WEIGHTS)
    if group.get("output_activations"):
        _refuse(f"{where}.output_activations")
    activations = group.get("input_activations")
    if activations is None:
        return "int8"
    _expect(f"{where}.input_activations", activations, INT8_TOKEN_ACTIVATIONS)
    return "w8a8_int8"


def _expect(where: str, args: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if args.get(key) != value:
            _refuse(f"{where}.{key} {args.get(key)!r} (needs {value!r})")


def _refuse(what: str) -> None:
    raise UnsupportedArchitectureError(f"{what} is not supported (supported: {SUPPORTED})")


def unpack_int8(name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    """pack-quantized tensors as the Linears load them: `weight_packed` (int32 [rows, cols / 4],
    each int32 four values + 128 as little-endian bytes, the columns in order) becomes the int8
    `weight` [rows, cols]; `weight_shape` (the unpacked shape, which the layer checks anyway) is
    dropped. Other tensors pass as they are."""
    if name.endswith(".weight_shape"):
        return []
    if name.endswith(".weight_packed"):
        if tensor.dtype != torch.int32:
            raise WeightLoadError(f"{name}: dtype {tensor.dtype}, expected int32 (8-bit "
                                  "values packed four to one)")
        values = tensor.contiguous().view(torch.uint8).to(torch.int16) - 128
        return [(name.removesuffix("_packed"), values.to(torch.int8))]
    return [(name, tensor)]
