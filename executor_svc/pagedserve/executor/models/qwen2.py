"""Qwen2 (and Qwen2.5): the LLaMA layout with a bias on q/k/v (none on o_proj).

Qwen2 configs carry a `sliding_window` even where it is off: the window applies only when
`use_sliding_window` is true, and then only to the layers from `max_window_layers` on (the
config's `layer_types`, where present, says which), as in transformers."""

from __future__ import annotations

from transformers import PretrainedConfig

from pagedserve.executor.models.llama import AttentionOptions, LlamaForCausalLM


def qwen2_layer_uses_window(config: PretrainedConfig, layer_idx: int) -> bool:
    if not getattr(config, "use_sliding_window", False):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx] == "sliding_attention"
    return layer_idx >= config.max_window_layers


def qwen2_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    window = config.sliding_window if qwen2_layer_uses_window(config, layer_idx) else None
    return AttentionOptions(qkv_bias=True, o_bias=False, sliding_window=window)


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(qwen2_attention_options)
