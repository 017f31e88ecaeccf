"""GPT-2 (and the checkpoints that share its layout: DistilGPT2, the GPT-2 fine-tunes), for the
flat paged batch: learned absolute position embeddings added to the token embeddings,
pre-LayerNorm blocks, a GELU MLP, and a head tied to the token embedding (or its own, where
`tie_word_embeddings` is false).

The checkpoint stores its projections as `Conv1D` weights, [in, out], the transpose of a
Linear's, and q, k and v fused in `c_attn` one after the other (all of q's heads, then k's,
then v's); the loader transposes and splits them (`checkpoint_tensors`). Checkpoints saved
before transformers prefixed the base model (`h.0...` for `transformer.h.0...`) and the causal
mask buffers they carry (`attn.bias`, `attn.masked_bias`) load too.

`scale_attn_weights` and `scale_attn_by_inverse_layer_idx` set the attention scale, as in
transformers; `reorder_and_upcast_attn` only changes how transformers rounds (our kernels
accumulate in float32 anyway). Cross-attention layers (`add_cross_attention`, GPT-2 as an
encoder-decoder's decoder) are refused at load."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import (
    CausalLM,
    ColumnParallelLinear,
    LayerNorm,
    PagedAttention,
    RowParallelLinear,
    UnsupportedArchitectureError,
    VocabParallelEmbedding,
    activation,
    qkv_projection,
)
from pagedserve.executor.parallel import TensorParallel
from pagedserve.kernels.attention import AttentionMetadata

CONV1D_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, layer_idx: int,
                 tp: TensorParallel):
        super().__init__()
        num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // num_heads
        self.c_attn, heads = qkv_projection(config.hidden_size, num_heads, num_heads,
                                            self.head_dim, True, dtype, tp)
        self.num_heads = heads.num_heads
        self.c_proj = RowParallelLinear(config.hidden_size, [config.hidden_size], True, dtype, tp)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=scale)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.c_attn.part_sizes, dim=-1)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return self.c_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        size = config.n_inner or 4 * config.hidden_size
        tp.split(size, "n_inner")
        self.c_fc = ColumnParallelLinear(config.hidden_size, [size], True, dtype, tp)
        self.c_proj = RowParallelLinear(size, [config.hidden_size], True, dtype, tp)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, layer_idx: int,
                 tp: TensorParallel):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps, dtype)
        self.attn = GPT2Attention(config, dtype, layer_idx, tp)
        self.ln_2 = LayerNorm(config.hidden_size, eps, dtype)
        self.mlp = GPT2MLP(config, dtype, tp)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attn(self.ln_1(x), meta) + x
        return self.mlp(self.ln_2(x)) + x


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        # Positions are few: the table is whole on every rank.
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype)
        self.wpe.weight.requires_grad_(False)
        self.h = nn.ModuleList(GPT2Block(config, dtype, i, tp)
                               for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, dtype)

    def forward(self, input_ids, positions, meta):
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    # c_attn is split by `checkpoint_tensors` into these three names.
    PACKED_MODULES = {"q_proj": ("c_attn", 0), "k_proj": ("c_attn", 1), "v_proj": ("c_attn", 2)}
    stack_name, embedding_name = "transformer", "wte"

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        if getattr(config, "add_cross_attention", False):
            raise UnsupportedArchitectureError(
                "add_cross_attention: GPT-2 with cross-attention layers (an encoder-decoder's "
                "decoder) is not supported")
        return GPT2Model(config, dtype, tp)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        if not name.startswith(("transformer.", "lm_head.")):
            name = f"transformer.{name}"  # saved before transformers prefixed the base model
        module_path, _, param_name = name.rpartition(".")
        if module_path.endswith(".attn") and param_name in ("bias", "masked_bias"):
            return []  # causal-mask buffers
        if module_path.endswith(CONV1D_MODULES) and param_name == "weight":
            tensor = tensor.t()
        if module_path.endswith(".attn.c_attn"):
            parent = module_path.rpartition(".")[0]
            return [(f"{parent}.{part}.{param_name}", t)
                    for part, t in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3),
                                       strict=True)]
        return [(name, tensor)]
