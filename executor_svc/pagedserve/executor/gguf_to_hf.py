"""Convert a GGUF file into a Hugging Face model directory (config, safetensors, tokenizer).

The executor's general loading path is a local Hugging Face directory; a GGUF file (the embedded
default model among them) is converted into one once and the directory is reused after. Two
forms (docs/quantization.md):
- native (the default): the linear layers' weights stay quantized. Each tensor in one of
  gguf_blocks.GROUPED_FORMATS (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K to Q6_K) is stored as
  its int8 values (`<name>.weight`) with float32 scales and offsets per group (`weight_scale`,
  `weight_offset`; gguf_blocks.py), and config.json says
  `quantization_config: {"quant_method": "gguf"}`, so the layers load as
  quantization.GroupedWeight and the kernels read the groups. The token embedding too: lookups
  dequantize the rows they take, and an output head that shares it (no `output.weight`)
  multiplies by the same quantized weight. Another quantized format is refused, naming the
  tensor: `--gguf-dequantize` loads it.
- dequantized (`--gguf-dequantize`): every weight is dequantized with the `gguf` package and
  stored as float32. A Q4_1 or Q8_0 value is `scale * q + min` with float16 scale and min,
  which float32 holds exactly and bfloat16 does not, so the converted model computes the same
  function as the GGUF (the executor casts to its compute dtype on load).

Architectures (`ARCHITECTURES`): llama (and Mixtral: llama with experts), qwen2, qwen3, phi3,
gemma2, gemma3, gpt2, falcon, qwen2moe and qwen3moe, the names llama.cpp's converter gives
them; the config comes from the metadata keys it writes. For LLaMA and Mixtral it permutes the
rows of the Q and K projections (interleaved rotary pairs); we undo that (on the values, scales
and offsets alike) so the weights follow the Hugging Face (rotate-half) layout; for Gemma it
adds one to every RMSNorm weight, which we take back; GPT-2's Conv1D weights it stores
transposed, and we transpose them back (they convert dequantized); Falcon's fused q/k/v it
reorders as all queries, then keys, then values, and we group them per KV head again. Its
stacked experts tensors (`ffn_*_exps`) become one tensor per expert again, dequantized. Not
converted, named in the error: other architectures (Gemma 1 and GPT-NeoX among them:
transformers, which rebuilds the tokenizer, does not read their GGUFs). Phi-3's LongRoPE
factors, which llama.cpp stores as tensors, go back into the config.
The tokenizer and chat template are rebuilt from the GGUF metadata by `transformers`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pagedserve.executor.gguf_blocks import GROUPED_FORMATS, grouped

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N."), as
# llama.cpp's converter names them for every architecture below.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # Mixture of experts: the router, the shared expert and its gate (Qwen2-MoE).
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# The experts, stacked by llama.cpp's converter into one [experts, rows, columns] tensor per
# projection: split back into the Hub's one tensor per expert (`mlp.experts.<e>.<proj>`).
_EXPERT_TENSORS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                   "ffn_down_exps.weight": "down_proj"}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class Architecture:
    """How one GGUF architecture becomes a Hugging Face directory."""

    hf_architecture: str
    model_type: str
    # llama.cpp permutes LLaMA's q and k rows for its interleaved rotary (not the NeoX-style
    # families); undone at conversion.
    permuted_qk: bool = False
    # GGUF layer tensor names that mean another tensor in this family.
    tensors: dict[str, str] = field(default_factory=dict)
    # Experts' projection names (Mixtral's checkpoints say w1, w3, w2) and their module.
    expert_names: dict[str, str] = field(default_factory=dict)
    moe_module: str = "mlp"
    # A router that renormalises its top-k weights unless `<arch>.expert_weights_norm` says.
    renormalize: bool = False
    # What llama.cpp added to every RMSNorm weight (Gemma's are stored as offsets from one).
    norm_offset: float = 0.0
    # Where the Hugging Face checkpoint keeps its layers and its other tensors, where not
    # under `model.` (GPT-2: `transformer.h.N.`).
    layer_prefix: str = "model.layers"
    global_tensors: dict[str, str] | None = None
    # Linears stored as Conv1D weights ([in, out], GPT-2): llama.cpp transposes them, and
    # so do we back, on float weights (these convert dequantized).
    conv1d: bool = False
    # Falcon: llama.cpp stores the fused q/k/v as all q rows, then k's, then v's; the
    # checkpoint groups them per KV head (models/falcon.py), and so do we again.
    grouped_qkv: bool = False


# Gemma 2 and 3: norms after attention and around the MLP (ffn_norm is the one before it).
_SANDWICH_NORMS = {"post_attention_norm.weight": "post_attention_layernorm.weight",
                   "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                   "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
_GPT2_LAYER_TENSORS = {f"{ours}.{param}": f"{theirs}.{param}" for ours, theirs in (
    ("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
    ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj"))
    for param in ("weight", "bias")}
_GPT2_GLOBAL_TENSORS = {"token_embd.weight": "transformer.wte.weight",
                        "position_embd.weight": "transformer.wpe.weight",
                        "output_norm.weight": "transformer.ln_f.weight",
                        "output_norm.bias": "transformer.ln_f.bias",
                        "output.weight": "lm_head.weight"}
_FALCON_LAYER_TENSORS = {
    "attn_qkv.weight": "self_attention.query_key_value.weight",
    "attn_output.weight": "self_attention.dense.weight",
    "ffn_up.weight": "mlp.dense_h_to_4h.weight", "ffn_down.weight": "mlp.dense_4h_to_h.weight",
    # the one norm of Falcon-7B; the MLP's of Falcon-40B's two (`attn_norm_2` the attention's)
    "attn_norm.weight": "input_layernorm.weight", "attn_norm.bias": "input_layernorm.bias",
    "attn_norm_2.weight": "ln_attn.weight", "attn_norm_2.bias": "ln_attn.bias"}
_FALCON_GLOBAL_TENSORS = {"token_embd.weight": "transformer.word_embeddings.weight",
                          "output_norm.weight": "transformer.ln_f.weight",
                          "output_norm.bias": "transformer.ln_f.bias",
                          "output.weight": "lm_head.weight"}
ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Architecture("Qwen2ForCausalLM", "qwen2"),
    "qwen3": Architecture("Qwen3ForCausalLM", "qwen3"),
    "phi3": Architecture("Phi3ForCausalLM", "phi3", tensors={
        "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight"}),  # gate and up fused
    "gemma2": Architecture("Gemma2ForCausalLM", "gemma2", tensors=_SANDWICH_NORMS,
                           norm_offset=1.0),
    "gemma3": Architecture("Gemma3ForCausalLM", "gemma3_text", tensors=_SANDWICH_NORMS,
                           norm_offset=1.0),
    "gpt2": Architecture("GPT2LMHeadModel", "gpt2", tensors=_GPT2_LAYER_TENSORS,
                         layer_prefix="transformer.h", global_tensors=_GPT2_GLOBAL_TENSORS,
                         conv1d=True),
    "falcon": Architecture("FalconForCausalLM", "falcon", tensors=_FALCON_LAYER_TENSORS,
                           layer_prefix="transformer.h",
                           global_tensors=_FALCON_GLOBAL_TENSORS, grouped_qkv=True),
    "qwen2moe": Architecture("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": Architecture("Qwen3MoeForCausalLM", "qwen3_moe", renormalize=True),
}
# LLaMA's GGUF architecture with experts is Mixtral.
MIXTRAL = Architecture("MixtralForCausalLM", "mixtral", permuted_qk=True,
                       expert_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
                       moe_module="block_sparse_moe", renormalize=True)


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture or tensor)."""


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str, arch: Architecture = ARCHITECTURES["llama"]) -> str:
    global_tensors = arch.global_tensors or _GLOBAL_TENSORS
    if gguf_name in global_tensors:
        return global_tensors[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    name = arch.tensors.get(suffix) or (None if arch.global_tensors
                                        else _LAYER_TENSORS.get(suffix))
    if prefix == "blk" and layer.isdigit() and name is not None:
        if name.startswith("mlp.") and arch.moe_module != "mlp":
            name = f"{arch.moe_module}.{name.removeprefix('mlp.')}"
        return f"{arch.layer_prefix}.{layer}.{name}"
    raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")


def _expert_tensors(gguf_name: str, array: np.ndarray,
                    arch: Architecture) -> list[tuple[str, np.ndarray]] | None:
    """A stacked experts tensor as one tensor per expert, by their checkpoint names; None for
    another tensor."""
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix != "blk" or suffix not in _EXPERT_TENSORS:
        return None
    proj = arch.expert_names.get(_EXPERT_TENSORS[suffix], _EXPERT_TENSORS[suffix])
    return [(f"model.layers.{layer}.{arch.moe_module}.experts.{e}.{proj}.weight", expert)
            for e, expert in enumerate(array)]


def grouped_qkv_rows(array: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """Rows [all q heads; all k heads; all v heads] -> per KV head: its query heads, its key,
    its value (Falcon's checkpoint layout; on values, scales, offsets and biases alike)."""
    head_dim = array.shape[0] // (num_heads + 2 * num_kv_heads)
    rest = array.shape[1:]
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    q = array[:q_rows].reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *rest)
    k = array[q_rows:q_rows + kv_rows].reshape(num_kv_heads, 1, head_dim, *rest)
    v = array[q_rows + kv_rows:].reshape(num_kv_heads, 1, head_dim, *rest)
    return np.concatenate([q, k, v], axis=1).reshape(array.shape)


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (per head: interleaved pairs -> halves)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def gguf_architecture(reader: gguf.GGUFReader, path: pathlib.Path) -> Architecture:
    name = _field(reader, "general.architecture")
    if name not in ARCHITECTURES:
        raise GGUFConversionError(
            f"{path}: GGUF architecture {name!r} is not supported for conversion "
            f"(supported: {', '.join(ARCHITECTURES)})")
    if name == "llama" and int(_field(reader, "llama.expert_count", 0)):
        return MIXTRAL
    return ARCHITECTURES[name]


# llama.cpp scales Gemma 2's and 3's scores by 1 / sqrt(head_dim), but their 27B models' by
# 1 / sqrt(hidden / heads), which it tells by their layer counts; so do we.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Every n-th layer attends to every position (llama.cpp's default where the file does not
# say: `<arch>.attention.sliding_window_pattern`).
_GEMMA_WINDOW_PATTERN = {"gemma2": 2, "gemma3": 6}


def _gemma_config(reader: gguf.GGUFReader, key: str, config: dict) -> dict:
    """Gemma 2's and 3's fields beyond the common ones: the GELU gate, the score scale, the
    alternating windows, the soft-caps and (Gemma 3) the local and global rope."""
    values = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    layers = config["num_hidden_layers"]
    big = layers == _GEMMA_27B_LAYERS[key]
    values["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"]
                                       if big else config["head_dim"])
    values["sliding_window"] = int(_field(reader, f"{key}.attention.sliding_window"))
    pattern = _field(reader, f"{key}.attention.sliding_window_pattern",
                     _GEMMA_WINDOW_PATTERN[key])
    values["layer_types"] = [
        "sliding_attention" if (pattern[i] if isinstance(pattern, list) else (i + 1) % pattern)
        else "full_attention" for i in range(layers)]
    values["final_logit_softcapping"] = _field(reader, f"{key}.final_logit_softcapping")
    if key == "gemma2":
        values["attn_logit_softcapping"] = _field(reader, f"{key}.attn_logit_softcapping")
        return values
    full = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    if _field(reader, f"{key}.rope.scaling.type") == "linear":
        full.update(rope_type="linear",
                    factor=float(_field(reader, f"{key}.rope.scaling.factor")))
    values["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": float(
            _field(reader, f"{key}.rope.freq_base_swa", 10000.0))}}
    return values


def _vocab_size(reader: gguf.GGUFReader, key: str) -> int:
    return int(_field(reader, f"{key}.vocab_size",
                      len(reader.fields["tokenizer.ggml.tokens"].data)))


def _special_token_ids(reader: gguf.GGUFReader) -> dict[str, int]:
    """The config's bos, eos and pad token ids, those the file names."""
    ids = {}
    for field_name, token in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                              ("pad_token_id", "padding")):
        value = _field(reader, f"tokenizer.ggml.{token}_token_id")
        if value is not None:
            ids[field_name] = int(value)
    return ids


def _gpt2_config(reader: gguf.GGUFReader, names: set[str]) -> dict:
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "vocab_size": _vocab_size(reader, "gpt2"),
              "n_embd": int(_field(reader, "gpt2.embedding_length")),
              "n_layer": int(_field(reader, "gpt2.block_count")),
              "n_head": int(_field(reader, "gpt2.attention.head_count")),
              "n_positions": int(_field(reader, "gpt2.context_length")),
              "n_inner": int(_field(reader, "gpt2.feed_forward_length")),
              "layer_norm_epsilon": float(_field(reader, "gpt2.attention.layer_norm_epsilon")),
              "activation_function": "gelu_new",
              # llama.cpp writes the tied head as its own `output.weight`, a copy
              "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "float32"}
    return config | _special_token_ids(reader)


def _falcon_config(reader: gguf.GGUFReader, names: set[str]) -> dict:
    """Falcon-40B's layout (two norms: `attn_norm_2` present) or Falcon-7B's (multi-query,
    one norm), attention and MLP side by side: the variants llama.cpp converts."""
    heads = int(_field(reader, "falcon.attention.head_count"))
    kv_heads = int(_field(reader, "falcon.attention.head_count_kv", 1))
    new_architecture = "blk.0.attn_norm_2.weight" in names
    config = {"architectures": ["FalconForCausalLM"], "model_type": "falcon",
              "vocab_size": _vocab_size(reader, "falcon"),
              "hidden_size": int(_field(reader, "falcon.embedding_length")),
              "ffn_hidden_size": int(_field(reader, "falcon.feed_forward_length")),
              "num_hidden_layers": int(_field(reader, "falcon.block_count")),
              "num_attention_heads": heads, "num_kv_heads": kv_heads,
              "new_decoder_architecture": new_architecture,
              "multi_query": not new_architecture and kv_heads == 1,
              "parallel_attn": True, "bias": False, "alibi": False,
              "max_position_embeddings": int(_field(reader, "falcon.context_length")),
              "layer_norm_epsilon": float(_field(reader, "falcon.attention.layer_norm_epsilon")),
              "rope_theta": float(_field(reader, "falcon.rope.freq_base", 10000.0)),
              "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "float32"}
    return config | _special_token_ids(reader)


# LongRoPE's per-channel factors, which llama.cpp stores as tensors (not checkpoint tensors).
ROPE_FACTOR_TENSORS = {"rope_factors_long.weight": "long_factor",
                       "rope_factors_short.weight": "short_factor"}


def _phi3_config(reader: gguf.GGUFReader, config: dict) -> dict:
    """Phi-3's partial rotary, window, and LongRoPE: its factors from their tensors, its
    trained length and attention factor from the keys llama.cpp writes beside them."""
    head_dim = config["head_dim"]
    rope = {"rope_type": "default", "rope_theta": config.pop("rope_theta"),
            "partial_rotary_factor": int(_field(reader, "phi3.rope.dimension_count",
                                                head_dim)) / head_dim}
    trained = int(_field(reader, "phi3.rope.scaling.original_context_length",
                         config["max_position_embeddings"]))
    factors = {ROPE_FACTOR_TENSORS[t.name]: gguf.quants.dequantize(t.data, t.tensor_type)
               .reshape(-1).tolist() for t in reader.tensors if t.name in ROPE_FACTOR_TENSORS}
    if factors:
        rope.update(rope_type="longrope", original_max_position_embeddings=trained, **factors)
        attention_factor = _field(reader, "phi3.rope.scaling.attn_factor")
        if attention_factor is not None:
            rope["attention_factor"] = float(attention_factor)
    return {"rope_parameters": rope, "original_max_position_embeddings": trained,
            "sliding_window": _field(reader, "phi3.attention.sliding_window")}


def hf_config(reader: gguf.GGUFReader, arch: Architecture) -> dict:
    """config.json for the GGUF's model, from its metadata (the keys llama.cpp's converter
    writes)."""
    if arch.model_type == "gpt2":
        return _gpt2_config(reader, {t.name for t in reader.tensors})
    if arch.model_type == "falcon":
        return _falcon_config(reader, {t.name for t in reader.tensors})
    key = _field(reader, "general.architecture")
    hidden = int(_field(reader, f"{key}.embedding_length"))
    heads = int(_field(reader, f"{key}.attention.head_count"))
    head_dim = int(_field(reader, f"{key}.attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": [arch.hf_architecture],
        "model_type": arch.model_type,
        "vocab_size": _vocab_size(reader, key),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{key}.feed_forward_length", 0)),
        "num_hidden_layers": int(_field(reader, f"{key}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{key}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{key}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{key}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{key}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        config["use_sliding_window"] = False
    if arch.model_type in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    if arch.model_type == "phi3":
        config.update(_phi3_config(reader, config))
    if arch.model_type.startswith("gemma"):
        config.update(_gemma_config(reader, key, config))
    experts = int(_field(reader, f"{key}.expert_count", 0))
    if experts:
        config["num_local_experts" if arch is MIXTRAL else "num_experts"] = experts
        config["num_experts_per_tok"] = int(_field(reader, f"{key}.expert_used_count"))
    if arch.model_type in ("qwen2_moe", "qwen3_moe"):
        config["moe_intermediate_size"] = int(_field(reader,
                                                     f"{key}.expert_feed_forward_length"))
        config["norm_topk_prob"] = bool(_field(reader, f"{key}.expert_weights_norm",
                                               arch.renormalize))
        config["decoder_sparse_step"], config["mlp_only_layers"] = 1, []
        shared = int(_field(reader, f"{key}.expert_shared_feed_forward_length", 0))
        if arch.model_type == "qwen2_moe":
            config["shared_expert_intermediate_size"] = shared
    return config | _special_token_ids(reader)


# GGUF formats stored as floats either way.
FLOAT_FORMATS = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                 gguf.GGMLQuantizationType.BF16)


def _converted_tensors(reader: gguf.GGUFReader, config: dict, arch: Architecture,
                       native: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: every weight as float32, or (`native`) the linear layers'
    quantized weights as int8 values with group scales and offsets. Experts (3-D tensors)
    are dequantized either way: the experts' kernels take float weights."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads", config.get("num_kv_heads"))
    # Falcon-40B's `attn_norm` is the MLP's norm, beside the attention's `attn_norm_2`.
    renames = {".input_layernorm.": ".ln_mlp."} if config.get("new_decoder_architecture") \
        else {}
    tensors = {}

    def add(name: str, array: np.ndarray) -> None:
        module = name.rpartition(".")[0]
        if arch.norm_offset and name.endswith("norm.weight"):
            array = array - arch.norm_offset
        if arch.grouped_qkv and module.endswith("query_key_value"):
            array = grouped_qkv_rows(array, heads, kv_heads)
        if arch.permuted_qk and module.endswith("q_proj"):  # values, scales and offsets
            array = unpermute_rotary_rows(array, heads)
        elif arch.permuted_qk and module.endswith("k_proj"):
            array = unpermute_rotary_rows(array, kv_heads)
        # A copy: F32 tensors are read-only views of the memory-mapped file.
        tensors[name] = torch.from_numpy(np.array(array, order="C"))

    for tensor in tqdm(reader.tensors, desc="converting GGUF", unit="tensor", leave=False):
        if tensor.name in ROPE_FACTOR_TENSORS:  # in the config (`_phi3_config`)
            continue
        if tensor.name.partition(".")[2].partition(".")[2] in _EXPERT_TENSORS:
            shape = tuple(reversed([int(d) for d in tensor.shape]))
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            for name, expert in _expert_tensors(tensor.name, array.astype(np.float32), arch):
                add(name, expert)
            continue
        name = hf_tensor_name(tensor.name, arch)
        for old, new in renames.items():
            name = name.replace(old, new)
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        qtype = tensor.tensor_type
        if native and qtype not in FLOAT_FORMATS + GROUPED_FORMATS:
            raise GGUFConversionError(
                f"{tensor.name}: GGUF format {qtype.name} does not run natively (natively: "
                f"{', '.join(t.name for t in GROUPED_FORMATS)}); --gguf-dequantize loads it "
                "as float")
        # Plain modules (routers, GPT-2's positions) take float weights only.
        plain = name.endswith(("mlp.gate.weight", "moe.gate.weight",
                               "shared_expert_gate.weight", "wpe.weight"))
        conv1d = arch.conv1d and len(shape) == 2 and name.startswith(arch.layer_prefix)
        if native and qtype in GROUPED_FORMATS and len(shape) == 2 and not (plain or conv1d):
            values, scales, offsets = grouped(tensor.data, qtype, shape[1])
            add(name, values)
            add(f"{name}_scale", scales)
            if offsets is not None:
                add(f"{name}_offset", offsets)
            continue
        array = gguf.quants.dequantize(tensor.data, qtype).reshape(shape)
        add(name, (array.T if conv1d else array).astype(np.float32))
    return tensors


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, native: bool = True) -> None:
    """Write a Hugging Face directory for `gguf_path` at `out_dir` (atomically: a reader never
    sees a half-written directory), with the linear layers' weights quantized as in the file
    (`native`) or dequantized to float32."""
    from transformers import AutoTokenizer  # heavy; only needed here

    reader = gguf.GGUFReader(gguf_path)
    arch = gguf_architecture(reader, gguf_path)
    config = hf_config(reader, arch)
    tensors = _converted_tensors(reader, config, arch, native)
    if native and any(name.endswith("_scale") for name in tensors):
        config["quantization_config"] = {"quant_method": "gguf"}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, staging / "model.safetensors",
                  metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
