"""Phi-3 (Phi-3 and Phi-3.5 mini/medium, Phi-4-mini: `Phi3ForCausalLM`): the LLaMA layout with
q/k/v fused in one `qkv_proj` (all of q's heads, then k's, then v's) and gate/up in one
`gate_up_proj` (gate first), split at load into the parts of our packed Linears so that tensor
parallelism slices each by heads and features; partial rotary (`partial_rotary_factor`,
Phi-4-mini); `sliding_window` on every layer where the config sets one; LongRoPE scaling
(models/rope.py says which factors serve)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import ActAndMul
from pagedserve.executor.models.llama import AttentionOptions, LlamaForCausalLM, LlamaMLP
from pagedserve.executor.parallel import TensorParallel


def phi3_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    return AttentionOptions(qkv_bias=False, o_bias=False,
                            sliding_window=getattr(config, "sliding_window", None))


class Phi3ForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(phi3_attention_options)

    def build_mlp(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                  layer_idx: int) -> nn.Module:
        act_and_mul = None if config.hidden_act == "silu" else ActAndMul(config.hidden_act)
        return LlamaMLP(config, dtype, tp, act_and_mul)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        module_path, _, param_name = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf == "qkv_proj":
            attention = self.model.layers[0].self_attn
            q_rows = self.config.num_attention_heads * attention.head_dim
            kv_rows = (tensor.shape[0] - q_rows) // 2
            parts = ("q_proj", "k_proj", "v_proj")
            tensors = tensor.split([q_rows, kv_rows, kv_rows])
        elif leaf == "gate_up_proj":
            parts, tensors = ("gate_proj", "up_proj"), tensor.chunk(2)
        else:
            return [(name, tensor)]
        return [(f"{parent}.{part}.{param_name}", t) for part, t in zip(parts, tensors,
                                                                          strict=True)]
