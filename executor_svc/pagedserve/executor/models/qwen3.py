"""Qwen3 (dense): Qwen2's layout without the q/k/v bias (`attention_bias`, off in the released
checkpoints, sets q/k/v and o alike) and with each head's q and k RMS-normed before rope
(`self_attn.q_norm` / `k_norm`, weights over head_dim). Sliding windows follow Qwen2's rule
(transformers' Qwen3Config derives `layer_types` the same way)."""

from __future__ import annotations

from transformers import PretrainedConfig

from pagedserve.executor.models.llama import AttentionOptions, LlamaForCausalLM
from pagedserve.executor.models.qwen2 import qwen2_layer_uses_window


def qwen3_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    window = config.sliding_window if qwen2_layer_uses_window(config, layer_idx) else None
    bias = getattr(config, "attention_bias", False)
    return AttentionOptions(qkv_bias=bias, o_bias=bias, sliding_window=window, qk_norm=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(qwen3_attention_options)
