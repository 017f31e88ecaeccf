"""Gemma, Gemma 2 and Gemma 3 (the text model, `Gemma3ForCausalLM`), for the flat paged batch,
on the LLaMA attention (llama.py) with what Gemma changes:

- embeddings scaled by sqrt(hidden_size) (the factor rounded to the model's dtype, as
  transformers does); a GeGLU MLP (tanh-approximated GELU gate);
- RMSNorm weights stored as offsets from one: the loader adds the one (`checkpoint_tensors`),
  so the shared RMSNorm kernels serve. In float32 this is exact; in bfloat16 the scale
  1 + w is rounded once to the dtype where transformers multiplies it in float32;
- Gemma 2 and 3: a norm after attention and around the MLP as well ("sandwich" norms), the
  attention scale `query_pre_attn_scalar ** -0.5`, layers alternating between a sliding window
  and full attention (`layer_types`), the final logits soft-capped
  (`final_logit_softcapping`: cap * tanh(logits / cap));
- Gemma 2: attention scores soft-capped too (`attn_logit_softcapping`, in the kernels);
- Gemma 3: q and k RMS-normed per head; local and global layers each with their own rope
  parameters (`rope_parameters` by layer type: a base of 10k on local layers, scaling on
  global ones). transformers' Gemma 3 keeps `attn_logit_softcapping` in its config but never
  applies it; neither do we.

Refused at load, naming the field: `use_bidirectional_attention` (EmbeddingGemma's encoder).
Gemma 3's multimodal checkpoints (`Gemma3ForConditionalGeneration`: 4B and up) serve their
language model alone, text in and text out (models/__init__.py, `TEXT_MODELS`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import (
    ActAndMul,
    RMSNorm,
    UnsupportedArchitectureError,
    VocabParallelEmbedding,
)
from pagedserve.executor.models.llama import (
    AttentionOptions,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
)
from pagedserve.executor.models.rope import rope_parameter_sets, rotary_cos_sin_cache
from pagedserve.executor.parallel import SINGLE, TensorParallel


def _sliding_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


def gemma_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    bias = config.attention_bias
    return AttentionOptions(qkv_bias=bias, o_bias=bias, sliding_window=None)


def gemma2_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    bias = config.attention_bias
    return AttentionOptions(qkv_bias=bias, o_bias=bias,
                            sliding_window=_sliding_window(config, layer_idx),
                            scale=config.query_pre_attn_scalar ** -0.5,
                            softcap=config.attn_logit_softcapping)


def gemma3_attention_options(config: PretrainedConfig, layer_idx: int) -> AttentionOptions:
    bias = config.attention_bias
    return AttentionOptions(qkv_bias=bias, o_bias=bias,
                            sliding_window=_sliding_window(config, layer_idx), qk_norm=True,
                            scale=config.query_pre_attn_scalar ** -0.5)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, options: AttentionOptions,
                 sandwich: bool, tp: TensorParallel):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.self_attn = LlamaAttention(config, dtype, options, tp)
        self.mlp = LlamaMLP(config, dtype, tp, ActAndMul(act))
        self.input_layernorm = RMSNorm(size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(size, eps, dtype)
        self.sandwich = sandwich
        if sandwich:
            self.pre_feedforward_layernorm = RMSNorm(size, eps, dtype)
            self.post_feedforward_layernorm = RMSNorm(size, eps, dtype)

    def forward(self, x, residual, positions, cos_sin, meta):
        """As LLaMA's, the residual add fused into the next norm; with sandwich norms the
        attention and MLP outputs are normed before they are added."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, meta)
        if not self.sandwich:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, attention_options,
                 sandwich: bool, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                   tp)
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5, dtype=dtype),
                             persistent=False)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, dtype, attention_options(config, i), sandwich, tp)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        head_dim = self.layers[0].self_attn.head_dim
        # One table per rope parameter set; each layer reads its layer type's.
        sets = rope_parameter_sets(config)
        for layer_type, params in sets.items():
            self.register_buffer(f"cos_sin_{layer_type or 'all'}",
                                 rotary_cos_sin_cache(config, head_dim, params),
                                 persistent=False)
        self.layer_tables = [f"cos_sin_{config.layer_types[i]}" if None not in sets
                             else "cos_sin_all" for i in range(config.num_hidden_layers)]

    def forward(self, input_ids, positions, meta):
        x, residual = self.embed_tokens(input_ids) * self.normalizer, None
        for layer, table in zip(self.layers, self.layer_tables, strict=True):
            x, residual = layer(x, residual, positions, getattr(self, table), meta)
        x, _ = self.norm(x, residual)
        return x


class GemmaForCausalLM(LlamaForCausalLM):
    attention_options = staticmethod(gemma_attention_options)
    sandwich_norms = False

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                "use_bidirectional_attention: bidirectional Gemma (an encoder) is not supported")
        super().__init__(config, dtype, tp)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        return GemmaModel(config, dtype, self.attention_options, self.sandwich_norms, tp)

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        if name.endswith("norm.weight"):  # stored as w, applied as 1 + w
            return [(name, tensor.float() + 1.0)]
        return [(name, tensor)]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits of the rows of `hidden` that sample (on rank 0; None on the others),
        soft-capped where the config says."""
        logits = super().compute_logits(hidden)
        if logits is not None and self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    attention_options = staticmethod(gemma2_attention_options)
    sandwich_norms = True


class Gemma3ForCausalLM(GemmaForCausalLM):
    attention_options = staticmethod(gemma3_attention_options)
    sandwich_norms = True
