"""Write GGUF files the way llama.cpp's converter does, from a Hugging Face LLaMA model."""

import json
import pathlib
from collections.abc import Callable

import gguf
import numpy as np
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pagedserve.testing.tiny_models import CHAT_TEMPLATE


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved rotary pairs), written independently of ours."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}"


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


def write_llama_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                     path: pathlib.Path, quant: Q | Callable[[str], Q] = Q.F32) -> None:
    """Matrices are stored as `quant` (norms stay F32, as llama.cpp does), or as the format
    `quant(gguf tensor name)` names: quantized by the gguf package where it can
    (QUANTIZABLE), random blocks (`random_blocks`) for the K formats."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for _, i in vocab])
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for seed, (name, tensor) in enumerate(model.state_dict().items()):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        qtype = quant(gguf_name(name)) if callable(quant) else quant
        if array.ndim == 2 and qtype in QUANTIZABLE:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name(name), random_blocks(*array.shape, qtype, seed),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _merges(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
