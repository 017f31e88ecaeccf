"""GPT-NeoX (Pythia, GPT-NeoX-20B, and the checkpoints that share its layout), for the flat
paged batch: LayerNorm with bias, parallel or sequential residual (`use_parallel_residual`),
partial rotary (`rotary_pct`, in transformers' `rope_parameters["partial_rotary_factor"]`), a
GELU MLP and an untied output head (`embed_out`).

The checkpoint stores q/k/v fused and interleaved per head ([heads, 3, head_dim] rows); the
loader splits it (`checkpoint_tensors`) into the q, k and v slices of one packed Linear."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import (
    CausalLM,
    ColumnParallelLinear,
    LayerNorm,
    PagedAttention,
    Rotary,
    RowParallelLinear,
    VocabParallelEmbedding,
    activation,
    qkv_projection,
)
from pagedserve.executor.models.rope import rotary_cos_sin_cache
from pagedserve.executor.models.weights import split_fused_qkv
from pagedserve.executor.parallel import TensorParallel
from pagedserve.kernels.attention import AttentionMetadata


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                 reduce: bool):
        super().__init__()
        num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // num_heads
        bias = getattr(config, "attention_bias", True)
        self.query_key_value, heads = qkv_projection(config.hidden_size, num_heads, num_heads,
                                                     self.head_dim, bias, dtype, tp)
        self.num_heads = heads.num_heads
        self.dense = RowParallelLinear(num_heads * self.head_dim, [config.hidden_size], bias,
                                       dtype, tp, reduce)
        self.rotary = Rotary()
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).split(self.query_key_value.part_sizes, dim=-1)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k = self.rotary(q.view(shape), k.view(shape), positions, cos_sin)
        return self.dense(self.attn(q, k, v.view(shape), meta))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                 reduce: bool):
        super().__init__()
        size = config.intermediate_size
        tp.split(size, "intermediate_size")
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, [size], True, dtype, tp)
        self.dense_4h_to_h = RowParallelLinear(size, [config.hidden_size], True, dtype, tp,
                                               reduce)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        eps = config.layer_norm_eps
        self.input_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, dtype)
        # Parallel residual: attention and MLP partial sums are all-reduced once, together.
        self.tp = tp
        self.attention = GPTNeoXAttention(config, dtype, tp, not self.use_parallel_residual)
        self.mlp = GPTNeoXMLP(config, dtype, tp, not self.use_parallel_residual)

    def forward(self, x, positions, cos_sin, meta):
        attn = self.attention(self.input_layernorm(x), positions, cos_sin, meta)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x))
            return self.tp.all_reduce(self.mlp(self.post_attention_layernorm(x)) + attn) + x
        # x + attn(ln1(x)), then that + mlp(ln2(that))
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, dtype, tp)
                                    for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype)
        head_dim = self.layers[0].attention.head_dim
        rotary_dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        self.register_buffer("cos_sin", rotary_cos_sin_cache(config, rotary_dim),
                             persistent=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.cos_sin, meta)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(CausalLM):
    # The fused query_key_value is split by `checkpoint_tensors` into these three names.
    PACKED_MODULES = {"q_proj": ("query_key_value", 0), "k_proj": ("query_key_value", 1),
                      "v_proj": ("query_key_value", 2)}
    stack_name, head_name, embedding_name = "gpt_neox", "embed_out", "embed_in"

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        return GPTNeoXModel(config, dtype, tp)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        if name.endswith((".attention.bias", ".attention.masked_bias")):
            return []  # causal-mask buffers that old checkpoints saved
        if name == "lm_head.weight":  # transformers' in-memory name for embed_out
            name = "embed_out.weight"
        if name.rpartition(".")[0].endswith(".attention.query_key_value"):
            return split_fused_qkv(name, tensor, self.config.num_attention_heads,
                                   self.gpt_neox.layers[0].attention.head_dim)
        return [(name, tensor)]
