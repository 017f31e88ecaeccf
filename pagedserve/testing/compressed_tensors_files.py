"""Quantized checkpoints in the compressed-tensors format, made for the tests by
compressed-tensors' own code from a transformers model, as llm-compressor makes them: the
scheme objects, `apply_quantization_config`, the scales by `calculate_qparams` (the function
llm-compressor's min-max observer calls), and `ModelCompressor` for the on-disk tensors and
config.json's `quantization_config`. Only the per-row min and max are taken here, which
llm-compressor's observer does.
"""

from __future__ import annotations

import pathlib

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
from transformers import PreTrainedModel


def scheme(name: str, weights: dict | None = None, fmt: str | None = None) -> QuantizationScheme:
    """`w8a8` (compressed-tensors' preset W8A8: int8 weights per channel, dynamic per-token int8
    activations), `w8a16` (int8 weights per channel only), or `fp8` (the preset FP8_DYNAMIC);
    `weights` overrides fields of the weights' arguments, `fmt` the on-disk format."""
    if name == "w8a8":
        result = preset_name_to_scheme("W8A8", ["Linear"])
    elif name == "fp8":
        result = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    else:  # the preset W8A16 has group scales: per-channel is spelled out
        result = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type=QuantizationType.INT, strategy=QuantizationStrategy.CHANNEL,
            symmetric=True, dynamic=False))
    if weights:
        result.weights = result.weights.model_copy(update=weights)
    if fmt is not None:
        result.format = fmt
    return result


@torch.no_grad()
def save_compressed(model: PreTrainedModel, quantization: QuantizationScheme,
                    directory: pathlib.Path, ignore: tuple[str, ...] = ("lm_head",)
                    ) -> pathlib.Path:
    """`model` quantized under `quantization` (every Linear but those in `ignore`) and saved
    compressed into `directory`."""
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": quantization},
                                                        ignore=list(ignore)))
    for module in model.modules():
        if not is_module_quantized(module):
            continue
        args = module.quantization_scheme.weights
        weight = module.weight
        if args.strategy == QuantizationStrategy.GROUP:
            grouped = weight.unflatten(-1, (-1, args.group_size))
            low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        else:
            low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
        scale, zero_point = calculate_qparams(low, high, args)
        update_offload_parameter(module, "weight_scale", scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            update_offload_parameter(module, "weight_zero_point",
                                     zero_point.to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    return directory


@torch.no_grad()
def decompressed_model(directory: pathlib.Path) -> PreTrainedModel:
    """The checkpoint in `directory` as a float32 transformers model whose quantized Linears
    hold what compressed-tensors' own compressor decompresses (its `decompress` on each
    module's stored tensors). A reference where transformers' loading falls short: it does not
    load pack-quantized zero points (packed along rows) into their modules. For checkpoints
    whose tensor names are the model's (LLaMA's)."""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    quantization = json.loads((directory / "config.json").read_text())["quantization_config"]
    (group,) = quantization["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group.get("format")
                                                        or quantization["format"])
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            module, _, local = name.rpartition(".")
            modules.setdefault(module, {})[local] = f.get_tensor(name)
    state = {}
    for module, parts in modules.items():
        if "weight_scale" in parts:
            parts = {"weight": compressor.decompress(parts, scheme)["weight"]}
        state.update({f"{module}.{local}": t.to(torch.float32) for local, t in parts.items()})
    loaded = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if loaded.unexpected_keys or set(loaded.missing_keys) != tied:
        raise ValueError(f"{directory}: unexpected {loaded.unexpected_keys}, missing "
                         f"{loaded.missing_keys}")
    if tied:
        model.tie_weights()
    return model
