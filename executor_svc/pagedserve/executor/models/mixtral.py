"""Mixtral: Mistral's attention (a window on every layer where the config sets one) with a
sparse MoE feed-forward on every layer: `num_local_experts` experts of `intermediate_size`, the
top `num_experts_per_tok` by the router's softmax, their weights renormalised (models/moe.py).
The checkpoint's `block_sparse_moe` (experts' w1 = gate, w3 = up, w2 = down) loads into our
`mlp`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.mistral import MistralForCausalLM
from pagedserve.executor.models.moe import ExpertStacker, SparseMoeBlock
from pagedserve.executor.parallel import SINGLE, TensorParallel


class MixtralForCausalLM(MistralForCausalLM):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__(config, dtype, tp)
        self.experts = ExpertStacker(config.num_local_experts,
                                     {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)})

    def build_mlp(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                  layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config, dtype, tp, num_experts=config.num_local_experts,
                              size_field="intermediate_size", renormalize=True)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        stacked = self.experts(name, tensor)  # errors name the checkpoint's tensors
        return [(n.replace(".block_sparse_moe.", ".mlp."), t)
                for n, t in ([(name, tensor)] if stacked is None else stacked)]
