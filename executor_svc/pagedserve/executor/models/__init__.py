"""Model families for the flat paged batch, and the registry from `config.architectures`."""

from __future__ import annotations

import importlib
import pathlib

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pagedserve.executor.models.layers import (
    Linear,
    UnsupportedArchitectureError,
    VocabParallelEmbedding,
    finish_quantized_loading,
)
from pagedserve.executor.models.quantized_checkpoints import (
    checkpoint_quantization,
    checkpoint_transform,
)
from pagedserve.executor.models.weights import TensorTransform, iter_checkpoint, load_checkpoint
from pagedserve.executor.parallel import SINGLE, TensorParallel

__all__ = ["ARCHITECTURES", "UnsupportedArchitectureError", "check_tensor_parallel", "load_model",
           "model_class"]

# Hugging Face architecture name -> "module:class".
ARCHITECTURES = {
    "LlamaForCausalLM": "pagedserve.executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pagedserve.executor.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "pagedserve.executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "pagedserve.executor.models.qwen3:Qwen3ForCausalLM",
    "GPTNeoXForCausalLM": "pagedserve.executor.models.gpt_neox:GPTNeoXForCausalLM",
    "FalconForCausalLM": "pagedserve.executor.models.falcon:FalconForCausalLM",
    "GPT2LMHeadModel": "pagedserve.executor.models.gpt2:GPT2LMHeadModel",
    "MixtralForCausalLM": "pagedserve.executor.models.mixtral:MixtralForCausalLM",
    "Qwen2MoeForCausalLM": "pagedserve.executor.models.qwen_moe:Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "pagedserve.executor.models.qwen_moe:Qwen3MoeForCausalLM",
    "Phi3ForCausalLM": "pagedserve.executor.models.phi3:Phi3ForCausalLM",
    "GemmaForCausalLM": "pagedserve.executor.models.gemma:GemmaForCausalLM",
    "Gemma2ForCausalLM": "pagedserve.executor.models.gemma:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "pagedserve.executor.models.gemma:Gemma3ForCausalLM",
}
# Multimodal checkpoints whose language model is served alone (text in, text out): their
# architecture -> the text model's, whose config is the checkpoint's `text_config`. Their
# language model's tensors are renamed to the text model's (`language_model.model.x`, or
# `model.language_model.x` as transformers 5 holds it, -> `model.x`); the vision tower's and
# the projector's are not loaded.
TEXT_MODELS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."),
                            ("model.language_model.", "model."),
                            ("language_model.lm_head.", "lm_head."))
_NOT_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                      "model.multi_modal_projector.")


def model_config(model_dir: pathlib.Path) -> tuple[PretrainedConfig, bool]:
    """The config of the model pagedserve builds for `model_dir`: its own, or a multimodal
    checkpoint's text model's (`TEXT_MODELS`); and whether it is the latter."""
    config = AutoConfig.from_pretrained(model_dir)
    text_model = next((TEXT_MODELS[a] for a in config.architectures or [] if a in TEXT_MODELS),
                      None)
    if text_model is None:
        return config, False
    text_config = config.get_text_config()
    text_config.architectures = [text_model]
    text_config.tie_word_embeddings = config.tie_word_embeddings
    if getattr(config, "quantization_config", None) is not None:  # the checkpoint's, whole
        text_config.quantization_config = config.quantization_config
    return text_config, True


def _text_model_tensors(name: str, tensor: torch.Tensor):
    if name.startswith(_NOT_TEXT_PREFIXES):
        return []
    for prefix, ours in _LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return [(ours + name.removeprefix(prefix), tensor)]
    return [(name, tensor)]


def model_class(architectures: list[str] | None) -> type[nn.Module]:
    for name in architectures or []:
        if name in ARCHITECTURES:
            module, _, cls = ARCHITECTURES[name].partition(":")
            return getattr(importlib.import_module(module), cls)
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(architectures or ['(none)'])} is not supported "
        f"(supported: {', '.join(sorted(ARCHITECTURES))})")


def load_model(model_dir: pathlib.Path, dtype: torch.dtype,
               tp: TensorParallel = SINGLE) -> nn.Module:
    """Build the model of a Hugging Face directory (this rank's slice of it; a multimodal
    checkpoint's language model, `TEXT_MODELS`) and load its safetensors checkpoint; a
    quantized one (quantized_checkpoints.py) loads its int8 layers as int8, their float
    weights released."""
    config, text_of_multimodal = model_config(model_dir)
    cls = model_class(config.architectures)
    quantization = checkpoint_quantization(config)
    with torch.device("cpu"):
        model = cls(config, dtype, tp)
    transform = getattr(model, "checkpoint_tensors", None)
    if text_of_multimodal:
        transform = _chained(_text_model_tensors, transform)
    if quantization is not None:
        for module in model.modules():
            if isinstance(module, (Linear, VocabParallelEmbedding)):
                module.checkpoint_w8a8 = quantization.dynamic_activations
        unpack = checkpoint_transform(quantization)
        if unpack is not None:
            transform = _chained(unpack, transform)
    load_checkpoint(model, iter_checkpoint(model_dir), cls.PACKED_MODULES, transform=transform)
    if quantization is not None:
        finish_quantized_loading(model, quantization.int16_activations)
    model.quantization = quantization.scheme if quantization else None
    return model.eval()


def _chained(first: TensorTransform, then: TensorTransform | None) -> TensorTransform:
    if then is None:
        return first
    return lambda name, tensor: [pair for n, t in first(name, tensor) for pair in then(n, t)]


def check_tensor_parallel(model_dir: pathlib.Path, size: int) -> None:
    """Raises TensorParallelError (or UnsupportedArchitectureError) if the model cannot be
    split over `size` ranks: built on the meta device, so nothing is allocated or loaded."""
    config, _ = model_config(model_dir)
    with torch.device("meta"):
        model_class(config.architectures)(config, torch.float32, TensorParallel(size=size))
