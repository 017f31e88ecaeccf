"""Qwen2-MoE and Qwen3-MoE: Qwen2's and Qwen3's attention with sparse MoE feed-forwards
(models/moe.py) on the layers `decoder_sparse_step` selects, except `mlp_only_layers`, which
keep a dense MLP of `intermediate_size`. Experts are `moe_intermediate_size` wide; the top-k
weights are renormalised where `norm_topk_prob`. Qwen2-MoE adds a shared expert
(`shared_expert_intermediate_size`) on every token, gated by a sigmoid. Qwen3-MoE attends
through `sliding_window` on every layer where `use_sliding_window` (transformers' rule)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.llama import AttentionOptions, LlamaForCausalLM, LlamaMLP
from pagedserve.executor.models.moe import ExpertStacker, SparseMoeBlock
from pagedserve.executor.models.qwen2 import qwen2_layer_uses_window
from pagedserve.executor.parallel import SINGLE, TensorParallel

QWEN_EXPERT_PROJECTIONS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1),
                           "down_proj": ("w2", 0)}


def qwen2_moe_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    window = config.sliding_window if qwen2_layer_uses_window(config, layer_idx) else None
    return AttentionOptions(qkv_bias=config.qkv_bias, o_bias=False, sliding_window=window)


def qwen3_moe_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    bias = config.attention_bias
    window = config.sliding_window if config.use_sliding_window else None
    return AttentionOptions(qkv_bias=bias, o_bias=bias, sliding_window=window, qk_norm=True)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(qwen2_moe_attention_options)
    shared_expert_field: str | None = "shared_expert_intermediate_size"

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__(config, dtype, tp)
        self.experts = ExpertStacker(config.num_experts, QWEN_EXPERT_PROJECTIONS)

    def build_mlp(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                  layer_idx: int) -> nn.Module:
        sparse = (layer_idx not in config.mlp_only_layers and config.num_experts > 0
                  and (layer_idx + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return LlamaMLP(config, dtype, tp)
        return SparseMoeBlock(config, dtype, tp, num_experts=config.num_experts,
                              size_field="moe_intermediate_size",
                              renormalize=config.norm_topk_prob,
                              shared_size_field=self.shared_expert_field)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        stacked = self.experts(name, tensor)
        return [(name, tensor)] if stacked is None else stacked


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    attention_options = staticmethod(qwen3_moe_attention_options)
    shared_expert_field = None
