"""LLaMA family (LLaMA 1-3, SmolLM, and the checkpoints that share its layout), for the flat
paged batch: GQA, rope scaling (linear, llama3), tied embeddings, optional attention bias.

Families with the same layout (Mistral, Qwen2, Qwen3) subclass `LlamaForCausalLM` and override
`attention_options`: which projections carry a bias, which layers attend through a sliding
window and whether q and k are normed per head, decided per family from its own config
fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import (
    CausalLM,
    ColumnParallelLinear,
    PagedAttention,
    RMSNorm,
    Rotary,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    qkv_projection,
)
from pagedserve.executor.models.rope import rotary_cos_sin_cache
from pagedserve.executor.parallel import TensorParallel
from pagedserve.kernels.attention import AttentionMetadata


@dataclass(frozen=True)
class AttentionOptions:
    """What differs between the attention layers of the LLaMA-layout families."""

    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None  # tokens a query sees, itself included; None: all
    # Qwen3, Gemma 3: each head's q and k RMS-normed (weights over head_dim) before rope.
    qk_norm: bool = False
    scale: float | None = None  # of q . k; None: head_dim ** -0.5
    softcap: float | None = None  # Gemma 2: scores become softcap * tanh(scores / softcap)


def llama_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    """LLaMA: `attention_bias` on q/k/v and o alike; never a sliding window (transformers'
    LLaMA ignores a `sliding_window` that a config may carry)."""
    bias = getattr(config, "attention_bias", False)
    return AttentionOptions(qkv_bias=bias, o_bias=bias, sliding_window=None)


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, options: AttentionOptions,
                 tp: TensorParallel):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        self.qkv_proj, heads = qkv_projection(config.hidden_size, num_heads, num_kv_heads,
                                              self.head_dim, options.qkv_bias, dtype, tp)
        self.num_heads, self.num_kv_heads = heads.num_heads, heads.num_kv_heads
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, [config.hidden_size],
                                        options.o_bias, dtype, tp)
        self.q_norm = self.k_norm = None
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.rotary = Rotary()
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   options.sliding_window, options.scale, options.softcap)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.part_sizes, dim=-1)
        num_tokens = x.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head: rows of head_dim
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q, k = self.rotary(q, k, positions, cos_sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU unless `act_and_mul` says otherwise;
    `config.intermediate_size` wide unless `size_field` names another field (an MoE's shared
    expert)."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                 act_and_mul: nn.Module | None = None, size_field: str = "intermediate_size"):
        super().__init__()
        size = getattr(config, size_field)
        tp.split(size, size_field)
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias, dtype,
                                                 tp)
        self.down_proj = RowParallelLinear(size, [config.hidden_size], bias, dtype, tp)
        self.act = act_and_mul or SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, options: AttentionOptions,
                 tp: TensorParallel, build_mlp: Callable[[], nn.Module]):
        super().__init__()
        self.self_attn = LlamaAttention(config, dtype, options, tp)
        self.mlp = build_mlp()  # after the attention: a split that fails names heads first
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x, residual, positions, cos_sin, meta):
        """Pre-norm block; the residual add is fused into the next norm."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype,
                 attention_options: Callable[[PretrainedConfig, int], AttentionOptions],
                 tp: TensorParallel, build_mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                   tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, dtype, attention_options(config, i), tp,
                              partial(build_mlp, i))
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        head_dim = self.layers[0].self_attn.head_dim
        # Rotary on the first channels of each head only where a family says (Phi-4-mini).
        rotary_dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        self.register_buffer("cos_sin", rotary_cos_sin_cache(config, rotary_dim),
                             persistent=False)

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.cos_sin, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    # Checkpoint projection name -> (our packed module, part).
    PACKED_MODULES = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1),
                      "v_proj": ("qkv_proj", 2), "gate_proj": ("gate_up_proj", 0),
                      "up_proj": ("gate_up_proj", 1)}

    attention_options = staticmethod(llama_attention_options)

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        """The decoder stack (`model.*` in the checkpoint); families with other blocks on this
        layout (Gemma) build theirs."""
        return LlamaModel(config, dtype, self.attention_options, tp,
                          lambda layer_idx: self.build_mlp(config, dtype, tp, layer_idx))

    def build_mlp(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel,
                  layer_idx: int) -> nn.Module:
        """Layer `layer_idx`'s feed-forward; families override it (Phi-3's activation, the
        MoE families' experts)."""
        return LlamaMLP(config, dtype, tp)
