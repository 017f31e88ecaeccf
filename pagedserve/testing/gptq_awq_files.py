"""GPTQ and AWQ checkpoints made for the tests by auto-round's own exporters (round-to-nearest,
no calibration data), from a float transformers model directory, and the float weights that
auto-round's own unpackers make of them (its GPTQ torch QuantLinear's and its AWQ
`dequantize_gemm`'s arithmetic, in float32): the reference the loaders are checked against.

Importing `auto_round` patches transformers (rope initialisation, from_pretrained's keywords,
compressed-tensors' quantizer), so all of it runs in a subprocess: `python -m
pagedserve.testing.gptq_awq_files SOURCE METHOD SYMMETRIC GROUP_SIZE BITS OUTPUT`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

# A float checkpoint of the same weights, in a folder of the quantized one.
REFERENCE = "reference"
FORMATS = {"gptq": "auto_gptq", "awq": "auto_awq"}


def save_gptq_awq(source: pathlib.Path, method: str, directory: pathlib.Path, *,
                  symmetric: bool, group_size: int, bits: int = 4) -> pathlib.Path:
    """The float model in `source` quantized by auto-round and exported in `method`'s format
    ("gptq" or "awq") into `directory`, with REFERENCE beside it; returns `directory`."""
    run = subprocess.run([sys.executable, "-m", __name__, str(source), method,
                          str(int(symmetric)), str(group_size), str(bits), str(directory)],
                         capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(f"auto-round's {method} export failed:\n{run.stderr[-3000:]}")
    return directory


def reference_model(directory: pathlib.Path) -> PreTrainedModel:
    """The checkpoint in `directory` as a float32 transformers model: its float tensors as they
    are, each quantized Linear's weight as auto-round's unpackers made it."""
    return AutoModelForCausalLM.from_pretrained(directory / REFERENCE,
                                                dtype=torch.float32).eval()


def reorder_gptq_columns(directory: pathlib.Path, output: pathlib.Path, *,
                         mlp_order: torch.Tensor, kv_head_order: torch.Tensor) -> pathlib.Path:
    """An act-order checkpoint of the same model as the 4-bit GPTQ checkpoint in `directory`
    (written into `output`, REFERENCE linked beside it): each layer's intermediate features
    renumbered by `mlp_order` (gate's and up's output channels, down's input columns) and its
    KV heads by `kv_head_order`, each with its query heads (q's, k's and v's output channels,
    o's input columns). The renumbered input columns of o and down keep their groups, so that
    their `g_idx` comes out of order, as GPTQ's act-order makes it; the model computes what it
    did, its quantized values unchanged."""
    config = json.loads((directory / "config.json").read_text())
    quantization = config["quantization_config"]
    if quantization["bits"] != 4:
        raise ValueError("4-bit checkpoints only")
    output.mkdir(parents=True)
    for path in directory.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (output / path.name).symlink_to(path.resolve())
    quantization["desc_act"] = True
    (output / "config.json").write_text(json.dumps(config))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_kv_head = config["num_attention_heads"] // len(kv_head_order)
    q_head_order = (kv_head_order[:, None] * per_kv_head + torch.arange(per_kv_head)).flatten()
    q_rows, kv_rows = (_rows(order, head_dim) for order in (q_head_order, kv_head_order))
    renumbered = {"mlp.gate_proj": (_reorder_outputs, mlp_order),
                  "mlp.up_proj": (_reorder_outputs, mlp_order),
                  "mlp.down_proj": (_reorder_inputs, mlp_order),
                  "self_attn.q_proj": (_reorder_outputs, q_rows),
                  "self_attn.k_proj": (_reorder_outputs, kv_rows),
                  "self_attn.v_proj": (_reorder_outputs, kv_rows),
                  "self_attn.o_proj": (_reorder_inputs, q_rows)}
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for module in [name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")]:
        for suffix, (reorder, order) in renumbered.items():
            if module.endswith(suffix):
                tensors.update(reorder(tensors, module, order))
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    return output


def _rows(head_order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels of heads in `head_order`."""
    return (head_order[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _reorder_outputs(tensors: dict[str, torch.Tensor], module: str, order: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """Output channel j of the module becomes what channel order[j] was."""
    zeros = _unpack(tensors[f"{module}.qzeros"], 1)[:, order]
    reordered = {f"{module}.{name}": tensors[f"{module}.{name}"][..., order].contiguous()
                 for name in ("qweight", "scales", "bias") if f"{module}.{name}" in tensors}
    return {**reordered, f"{module}.qzeros": _pack(zeros, 1)}


def _reorder_inputs(tensors: dict[str, torch.Tensor], module: str, order: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """Input column j of the module becomes what column order[j] was, in its group."""
    values = _unpack(tensors[f"{module}.qweight"], 0)[order]
    return {f"{module}.qweight": _pack(values, 0),
            f"{module}.g_idx": tensors[f"{module}.g_idx"][order].contiguous()}


def _unpack(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words of eight 4-bit values each, the first in the low bits, packed along `dim`."""
    nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=dim + 1)
    return nibbles.flatten(dim, dim + 1)


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    groups = values.unflatten(dim, (-1, 8)).to(torch.int64)
    words = sum(groups.select(dim + 1, i) << (4 * i) for i in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _write(source: pathlib.Path, method: str, symmetric: bool, group_size: int, bits: int,
           directory: pathlib.Path) -> None:
    from auto_round import AutoRound

    from pagedserve.testing.tiny_models import byte_level_tokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    # auto-round finds the decoder layers of most families itself, not Falcon's.
    blocks = "transformer.h" if model.config.model_type == "falcon" else None
    rounder = AutoRound(model, tokenizer=byte_level_tokenizer(), bits=bits,
                        group_size=group_size, sym=symmetric, iters=0, disable_opt_rtn=True,
                        to_quant_block_names=blocks)
    rounder.quantize_and_save(str(directory / "export"), format=FORMATS[method])
    # auto-round writes into a folder named after the model and scheme: bring its files up.
    (written,) = (directory / "export").glob("*/config.json")
    for path in written.parent.iterdir():
        path.rename(directory / path.name)
    written.parent.rmdir()
    (directory / "export").rmdir()
    config = json.loads((directory / "config.json").read_text())
    reference = directory / REFERENCE
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps(
        {key: value for key, value in config.items() if key != "quantization_config"}))
    save_file(_float_tensors(directory / "model.safetensors", method,
                             config["quantization_config"]),
              str(reference / "model.safetensors"), metadata={"format": "pt"})


def _float_tensors(checkpoint: pathlib.Path, method: str, quantization: dict
                   ) -> dict[str, torch.Tensor]:
    """The checkpoint's float tensors as they are, and each quantized module's weight."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(checkpoint, framework="pt") as f:
        for name in f.keys():
            module, _, param = name.rpartition(".")
            if param in ("qweight", "qzeros", "scales", "g_idx"):
                modules.setdefault(module, {})[param] = f.get_tensor(name)
            else:
                tensors[name] = f.get_tensor(name).to(torch.float32)
    unpack = _gptq_weight if method == "gptq" else _awq_weight
    for module, parts in modules.items():
        tensors[f"{module}.weight"] = unpack(parts, quantization).T.contiguous()
    return tensors


def _gptq_weight(parts: dict[str, torch.Tensor], quantization: dict) -> torch.Tensor:
    """W^T [in, out], by auto-round's GPTQ QuantLinear: its forward on the identity. Without
    `g_idx`, which its forward mishandles for layers of more outputs than inputs, and which
    round-to-nearest leaves in order (checked)."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    bits, size, columns = quantization["bits"], quantization["group_size"], parts["g_idx"].numel()
    in_order = torch.arange(columns) // (columns if size == -1 else size)
    if not torch.equal(parts["g_idx"].long(), in_order):
        raise ValueError("g_idx is out of order")
    layer = QuantLinear(bits, size, columns, parts["scales"].shape[1], bias=False)
    for name in ("qweight", "qzeros"):
        setattr(layer, name, parts[name])
    layer.scales = parts["scales"].to(torch.float32)
    return layer(torch.eye(columns, dtype=torch.float32))


def _awq_weight(parts: dict[str, torch.Tensor], quantization: dict) -> torch.Tensor:
    from auto_round.export.export_to_awq.utils import dequantize_gemm

    return dequantize_gemm(parts["qweight"], parts["qzeros"], parts["scales"].to(torch.float32),
                           quantization["bits"], quantization["group_size"])


if __name__ == "__main__":
    source, method, symmetric, group_size, bits, output = sys.argv[1:]
    _write(pathlib.Path(source), method, symmetric == "1", int(group_size), int(bits),
           pathlib.Path(output))
