"""Tiny random-weight models in Hugging Face format, built with `transformers` itself, so tests
compare pagedserve against an independent reference without any download."""

import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over the 256 byte symbols plus a few merges and specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(directory: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **overrides))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# Tiny configs of the other model families (float32, random weights; see save_tiny_model).

def tiny_mistral_config(vocab_size: int, **overrides) -> MistralConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=8, tie_word_embeddings=False)
    values.update(overrides)
    return MistralConfig(**values)


def tiny_qwen2_config(vocab_size: int, **overrides) -> Qwen2Config:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                  use_sliding_window=False, sliding_window=8, max_window_layers=1,
                  tie_word_embeddings=True)
    values.update(overrides)
    return Qwen2Config(**values)


def tiny_qwen3_config(vocab_size: int, **overrides) -> Qwen3Config:
    """head_dim 32 over 4 heads of a 64-wide model (Qwen3's heads are wider than
    hidden / heads, as in the released checkpoints)."""
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, use_sliding_window=False, sliding_window=8,
                  max_window_layers=1, tie_word_embeddings=True)
    values.update(overrides)
    return Qwen3Config(**values)


def tiny_gpt_neox_config(vocab_size: int, **overrides) -> GPTNeoXConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                  rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
                  use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False)
    values.update(overrides)
    return GPTNeoXConfig(**values)


def tiny_falcon_config(vocab_size: int, **overrides) -> FalconConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_kv_heads=2, max_position_embeddings=256,
                  layer_norm_epsilon=1e-5, new_decoder_architecture=True, multi_query=False,
                  parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=True)
    values.update(overrides)
    return FalconConfig(**values)


def tiny_gpt2_config(vocab_size: int, **overrides) -> GPT2Config:
    values = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new",
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    values.update(overrides)
    return GPT2Config(**values)


def tiny_gemma_config(vocab_size: int, **overrides) -> GemmaConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return GemmaConfig(**values)


def tiny_gemma2_config(vocab_size: int, **overrides) -> Gemma2Config:
    """Layer 0 windowed (8), layer 1 full; caps small enough to change tiny random logits."""
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, query_pre_attn_scalar=24, sliding_window=8,
                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return Gemma2Config(**values)


def tiny_gemma3_config(vocab_size: int, **overrides) -> Gemma3TextConfig:
    """Layer 0 local (window 8, base 10k), layer 1 global (base 1M, linear scaling x2)."""
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6,
                  query_pre_attn_scalar=24, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                      "full_attention": {"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 1000000.0}},
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return Gemma3TextConfig(**values)


def tiny_phi3_config(vocab_size: int, **overrides) -> Phi3Config:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, original_max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    values.update(overrides)
    return Phi3Config(**values)


def tiny_mixtral_config(vocab_size: int, **overrides) -> MixtralConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return MixtralConfig(**values)


def tiny_qwen2_moe_config(vocab_size: int, **overrides) -> Qwen2MoeConfig:
    """Layer 0 dense (mlp_only_layers), layer 1 sparse with a shared expert."""
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=48, shared_expert_intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                  num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0],
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return Qwen2MoeConfig(**values)


def tiny_qwen3_moe_config(vocab_size: int, **overrides) -> Qwen3MoeConfig:
    values = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=10000.0, num_experts=8, num_experts_per_tok=3,
                  norm_topk_prob=True, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def randomize_weights(model: PreTrainedModel, std: float = 0.1) -> None:
    """Draw every parameter at random, biases and norm weights included: transformers
    initialises biases to zero and norms to one, and a bias or norm loaded into the wrong place
    would then go unnoticed. Norm weights stay near one so activations keep their scale."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.add_(1.0)


def save_tiny_model(directory: pathlib.Path, config: PretrainedConfig,
                    seed: int = 0) -> pathlib.Path:
    """A tiny float32 model of `config`'s family, random weights, saved with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model)
    model.save_pretrained(directory)
    return directory
