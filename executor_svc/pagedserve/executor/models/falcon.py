"""Falcon, for the flat paged batch, in its rotary variants:

- the new decoder architecture (Falcon 40B/180B, `new_decoder_architecture`): grouped KV heads
  (`num_kv_heads`), attention and MLP side by side on one residual, each after its own LayerNorm
  (`ln_attn`, `ln_mlp`) or after a shared one (`num_ln_in_parallel_attn` = 1);
- the original one (Falcon 7B): multi-query (`multi_query`, one KV head) or multi-head
  attention, and `parallel_attn` (attention and MLP side by side after one LayerNorm) or the
  sequential pre-norm block.

The checkpoint's fused query_key_value is split at load time (`checkpoint_tensors`): every
variant lays it out per KV head (that head's queries, then its key, then its value).

Not supported: ALiBi Falcon (`alibi=True`, the falcon-rw models), which needs ALiBi biases in
kernels/pagedserve/kernels/attention.py; loading one fails naming this."""

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
    UnsupportedArchitectureError,
    VocabParallelEmbedding,
    activation,
    qkv_projection,
)
from pagedserve.executor.models.rope import rotary_cos_sin_cache
from pagedserve.executor.models.weights import split_fused_qkv
from pagedserve.executor.parallel import TensorParallel
from pagedserve.kernels.attention import AttentionMetadata


def falcon_num_kv_heads(config: PretrainedConfig) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


class FalconAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                 reduce: bool):
        super().__init__()
        num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // num_heads
        self.query_key_value, heads = qkv_projection(
            config.hidden_size, num_heads, falcon_num_kv_heads(config), self.head_dim,
            config.bias, dtype, tp)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.dense = RowParallelLinear(num_heads * self.head_dim, [config.hidden_size],
                                       config.bias, dtype, tp, reduce)
        self.rotary = Rotary()
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).split(self.query_key_value.part_sizes, dim=-1)
        num_tokens = x.shape[0]
        q, k = self.rotary(q.view(num_tokens, self.num_heads, self.head_dim),
                           k.view(num_tokens, self.num_kv_heads, self.head_dim), positions, cos_sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        return self.dense(self.attn(q, k, v, meta))


class FalconMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                 reduce: bool):
        super().__init__()
        size = config.ffn_hidden_size
        tp.split(size, "ffn_hidden_size")
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, [size], config.bias, dtype,
                                                  tp)
        self.dense_4h_to_h = RowParallelLinear(size, [config.hidden_size], config.bias, dtype,
                                               tp, reduce)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        size, eps = config.hidden_size, config.layer_norm_epsilon
        # The new architecture is always parallel (transformers cannot run it otherwise).
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        self.two_norms = (config.new_decoder_architecture
                          and (config.num_ln_in_parallel_attn or 2) == 2)
        # Parallel: attention and MLP partial sums are all-reduced once, together.
        self.tp = tp
        self.self_attention = FalconAttention(config, dtype, tp, not self.parallel)
        self.mlp = FalconMLP(config, dtype, tp, not self.parallel)
        if self.two_norms:
            self.ln_attn = LayerNorm(size, eps, dtype)
            self.ln_mlp = LayerNorm(size, eps, dtype)
        else:
            self.input_layernorm = LayerNorm(size, eps, dtype)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(size, eps, dtype)

    def forward(self, x, positions, cos_sin, meta):
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(attn_in, positions, cos_sin, meta)
        if self.parallel:
            return self.tp.all_reduce(self.mlp(mlp_in) + attn) + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class FalconModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                      dtype, tp)
        self.h = nn.ModuleList(FalconDecoderLayer(config, dtype, tp)
                               for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype)
        head_dim = self.h[0].self_attention.head_dim
        self.register_buffer("cos_sin", rotary_cos_sin_cache(config, head_dim),
                             persistent=False)

    def forward(self, input_ids, positions, meta):
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x = layer(x, positions, self.cos_sin, meta)
        return self.ln_f(x)


class FalconForCausalLM(CausalLM):
    # The fused query_key_value is split by `checkpoint_tensors` into these three names.
    PACKED_MODULES = {"q_proj": ("query_key_value", 0), "k_proj": ("query_key_value", 1),
                      "v_proj": ("query_key_value", 2)}
    stack_name, embedding_name = "transformer", "word_embeddings"

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        if getattr(config, "alibi", False):
            raise UnsupportedArchitectureError(
                "Falcon with alibi=True (the falcon-rw models) is not supported: the attention "
                "kernels have no ALiBi biases; rotary Falcon models are")
        return FalconModel(config, dtype, tp)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        if name.rpartition(".")[0].endswith(".self_attention.query_key_value"):
            return split_fused_qkv(name, tensor, falcon_num_kv_heads(self.config),
                                   self.transformer.h[0].self_attention.head_dim)
        return [(name, tensor)]
