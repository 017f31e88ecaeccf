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

llama.cpp's converter permutes the rows of the Q and K projections (interleaved rotary pairs);
we undo that (on the values, scales and offsets alike) so the weights follow the Hugging Face
(rotate-half) layout. The tokenizer and chat template are
rebuilt from the GGUF metadata by `transformers`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from pagedserve.executor.gguf_blocks import GROUPED_FORMATS, grouped

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture or tensor)."""


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
        return f"model.layers.{layer}.{_LAYER_TENSORS[suffix]}"
    raise GGUFConversionError(f"unsupported GGUF tensor {gguf_name!r}")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (per head: interleaved pairs -> halves)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, cols)
            .swapaxes(1, 2).reshape(rows, cols))


def llama_config(reader: gguf.GGUFReader, has_output: bool) -> dict:
    arch = _field(reader, "general.architecture")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", len(tokens.data))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                      ("pad_token_id", "padding")):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


# GGUF formats stored as floats either way.
FLOAT_FORMATS = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                 gguf.GGMLQuantizationType.BF16)


def _converted_tensors(reader: gguf.GGUFReader, config: dict,
                       native: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: every weight as float32, or (`native`) the linear layers'
    quantized weights as int8 values with group scales and offsets."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}

    def add(name: str, array: np.ndarray) -> None:
        module = name.rpartition(".")[0]
        if module.endswith("q_proj"):
            array = unpermute_rotary_rows(array, heads)
        elif module.endswith("k_proj"):
            array = unpermute_rotary_rows(array, kv_heads)
        # A copy: F32 tensors are read-only views of the memory-mapped file.
        tensors[name] = torch.from_numpy(np.array(array, order="C"))

    for tensor in tqdm(reader.tensors, desc="converting GGUF", unit="tensor", leave=False):
        name = hf_tensor_name(tensor.name)
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        qtype = tensor.tensor_type
        if native and qtype not in FLOAT_FORMATS + GROUPED_FORMATS:
            raise GGUFConversionError(
                f"{tensor.name}: GGUF format {qtype.name} does not run natively (natively: "
                f"{', '.join(t.name for t in GROUPED_FORMATS)}); --gguf-dequantize loads it "
                "as float")
        if native and qtype in GROUPED_FORMATS and len(shape) == 2:
            values, scales, offsets = grouped(tensor.data, qtype, shape[1])
            add(name, values)
            add(f"{name}_scale", scales)
            if offsets is not None:
                add(f"{name}_offset", offsets)
            continue
        array = gguf.quants.dequantize(tensor.data, qtype).reshape(shape)
        add(name, array.astype(np.float32))
    return tensors


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, native: bool = True) -> None:
    """Write a Hugging Face directory for `gguf_path` at `out_dir` (atomically: a reader never
    sees a half-written directory), with the linear layers' weights quantized as in the file
    (`native`) or dequantized to float32."""
    from transformers import AutoTokenizer  # heavy; only needed here

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported for conversion "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = llama_config(reader, has_output)
    tensors = _converted_tensors(reader, config, native)
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
