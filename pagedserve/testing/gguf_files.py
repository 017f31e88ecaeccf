"""Write GGUF files the way llama.cpp's converter does, from a Hugging Face model of the families it
converts that pagedserve reads back (gguf_to_hf.ARCHITECTURES)."""

import json
import math
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from pagedserve.testing.tiny_models import CHAT_TEMPLATE


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved rotary pairs), written independently of ours."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# transformers' model_type -> llama.cpp's architecture (its converter writes Mistral-style and
# Mixtral checkpoints as llama).
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mixtral": gguf.MODEL_ARCH.LLAMA,
          "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
          "phi3": gguf.MODEL_ARCH.PHI3, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
          "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "gpt2": gguf.MODEL_ARCH.GPT2,
          "falcon": gguf.MODEL_ARCH.FALCON,
          "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")


def gguf_name(hf_name: str, model_type: str = "llama", num_layers: int = 64) -> str:
    """The GGUF name llama.cpp's converter gives a Hugging Face tensor (the gguf package's own
    table, not ours)."""
    names = gguf.get_tensor_name_map(ARCHES[model_type], num_layers)
    if model_type == "gpt2":
        hf_name = hf_name.removeprefix("transformer.")  # the table has GPT-2's own names
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise KeyError(f"{hf_name}: no GGUF name for {model_type}")
    return name


Q = gguf.GGMLQuantizationType
# Formats the gguf package can quantize to (it only dequantizes the K formats).
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.TQ2_0)


def random_blocks(rows: int, columns: int, qtype: Q, seed: int) -> np.ndarray:
    """A [rows, columns] tensor of random `qtype` blocks (a K format, which the gguf package
    cannot quantize to: the model's weights are replaced, not rounded) whose float16 factors are
    small, so that the weights stay about the size of a random model's."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows * columns // block_size, type_size), dtype=np.uint8)
    factors = rng.uniform(2e-5, 1e-4, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d and dmin lead the block
        blocks[:, :4] = factors
    elif qtype in (Q.Q6_K, Q.Q3_K):  # d ends it
        blocks[:, -2:] = factors[:, :2]
    elif qtype == Q.Q2_K:  # d and dmin end it
        blocks[:, -4:] = factors
    else:
        raise ValueError(f"random blocks of {qtype.name} are not written here")
    return blocks.reshape(rows, -1)


def _checkpoint_tensors(model: PreTrainedModel):
    """(name, float32 array) as llama.cpp's converter takes them: a stacked experts tensor of
    transformers 5 (`experts.gate_up_proj` [experts, 2 * intermediate, hidden]) split into its
    gate and up halves, as the Hub's per-expert tensors stack."""
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("experts.gate_up_proj"):
            gate, up = np.split(array, 2, axis=1)
            yield name.replace("gate_up_proj", "gate_proj"), gate
            yield name.replace("gate_up_proj", "up_proj"), up
        else:
            yield name, array


def _gpt2_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _falcon_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.ffn_hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])


def _phi3_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    """Phi-3's window and trained length; with LongRoPE, its attention factor (llama.cpp's
    formula) and its factors, as tensors."""
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    trained = cfg.original_max_position_embeddings
    writer.add_rope_scaling_orig_ctx_len(trained)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "longrope":
        scale = cfg.max_position_embeddings / trained
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(trained)) if scale > 1 else 1.0)
        writer.add_tensor("rope_factors_long.weight",
                          np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight",
                          np.array(rope["short_factor"], dtype=np.float32))


def falcon_qkv_rows(array: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """llama.cpp's Falcon q/k/v order (all q rows, then k's, then v's) from the checkpoint's
    (per KV group: its queries, its key, its value), written after its converter's views."""
    head_dim = array.shape[0] // (num_heads + 2 * num_kv_heads)
    qkv = array.reshape(num_kv_heads, num_heads // num_kv_heads + 2, head_dim, -1)
    q = qkv[:, :-2].reshape(num_heads * head_dim, -1)
    k = qkv[:, [-2]].reshape(num_kv_heads * head_dim, -1)
    v = qkv[:, [-1]].reshape(num_kv_heads * head_dim, -1)
    return np.concatenate((q, k, v)).reshape(array.shape)


def _metadata(writer: gguf.GGUFWriter, cfg) -> None:
    """The keys llama.cpp's converter writes for the LLaMA-layout families."""
    model_type = cfg.model_type
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if "rope_theta" in cfg.rope_parameters:
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rotary = int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(rotary)
    if model_type == "phi3":
        _phi3_metadata(writer, cfg)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if model_type == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if model_type in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if model_type == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if model_type == "gemma3_text":  # the global layers' rope; the local ones' base is fixed
        full = cfg.rope_parameters["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])



def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: pathlib.Path,
               quant: Q | Callable[[str], Q] = Q.F32) -> None:
    """A GGUF of `model` (LLaMA, Mixtral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3, GPT-2,
    Qwen2-MoE or Qwen3-MoE) as llama.cpp's converter writes it: its metadata keys, tensor
    names, LLaMA's q/k row permutation, Gemma's norms plus one, GPT-2's transposed Conv1D
    weights and tied head written out. Matrices are stored as `quant` (norms
    and biases stay F32, as llama.cpp does), or as the format `quant(gguf tensor name)`
    names: quantized by the gguf package where it can (QUANTIZABLE), random blocks
    (`random_blocks`) for the K formats."""
    cfg = model.config
    model_type = cfg.model_type
    arch = ARCHES[model_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    if model_type == "gpt2":
        _gpt2_metadata(writer, cfg)
    elif model_type == "falcon":
        _falcon_metadata(writer, cfg)
    else:
        _metadata(writer, cfg)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for _, i in vocab])
    writer.add_token_merges(_merges(tokenizer))
    for token_id, add in ((cfg.bos_token_id, writer.add_bos_token_id),
                          (cfg.eos_token_id, writer.add_eos_token_id),
                          (cfg.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    permute = arch == gguf.MODEL_ARCH.LLAMA
    gemma = model_type.startswith("gemma")
    for seed, (name, array) in enumerate(_checkpoint_tensors(model)):
        if gemma and name.endswith("norm.weight"):  # llama.cpp's norms multiply by 1 + w
            array = array + 1
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if permute and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if model_type == "falcon" and "query_key_value" in name:
            kv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1
            array = falcon_qkv_rows(array, cfg.num_attention_heads, kv)
        if model_type == "gpt2" and name.endswith(CONV1D_WEIGHTS):
            array = array.T  # llama.cpp stores GPT-2's Conv1D weights as [out, in]
        target = gguf_name(name, model_type, cfg.num_hidden_layers)
        if not target.endswith((".weight", ".bias")):
            target += ".weight"  # the stacked experts have no suffix in transformers 5
        qtype = quant(target) if callable(quant) else quant
        if ".ffn_gate_inp" in target:  # llama.cpp never quantizes the routers
            qtype = Q.F32
        if array.ndim >= 2 and qtype in QUANTIZABLE:
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(target, random_blocks(*array.shape, qtype, seed),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(target, array)
        if model_type == "gpt2" and target == "token_embd.weight":  # its tied head, a copy
            writer.add_tensor("output.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _merges(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
