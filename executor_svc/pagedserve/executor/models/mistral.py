"""Mistral: the LLaMA layout with no attention bias and, where the config sets `sliding_window`,
that window on every layer (Mistral 7B v0.1; later versions set it to null: full attention)."""

from __future__ import annotations

from transformers import PretrainedConfig

from pagedserve.executor.models.llama import AttentionOptions, LlamaForCausalLM


def mistral_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    return AttentionOptions(qkv_bias=False, o_bias=False,
                            sliding_window=getattr(config, "sliding_window", None))


class MistralForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(mistral_attention_options)
