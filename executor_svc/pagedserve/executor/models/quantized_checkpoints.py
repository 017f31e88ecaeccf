"""Quantized checkpoints as the Hub ships them (docs/quantization.md): the method a config.json's
`quantization_config` names, read as vLLM reads it, and the tensors to reshape before they load.

Supported: compressed-tensors (the format llm-compressor writes) with int weights of 8 or 4
bits, one scale per output channel or per group of columns, symmetric or with zero points, and
- no activation quantization: W8A16 (`int8`) and W4A16 (`w4a16`, llm-compressor's most common
  4-bit scheme, group 128);
- or dynamic per-token int8 activations with symmetric per-channel int8 weights (W8A8,
  `w8a8_int8`);
- or fp8 (e4m3) weights per channel (or one scale per tensor) with dynamic per-token fp8
  activations (FP8_DYNAMIC, format `float-quantized`: `fp8`, as `--quantization fp8` makes,
  and refused where it is: on devices without fp8 tensor cores).
Per-channel symmetric int8 is exactly what `--quantization int8` / `w8a8_int8` make
(kernels/pagedserve/kernels/quantization.py: Int8Weight), and runs on the same kernels. Group
scales, 4-bit values and zero points load as GroupedWeight (W = s · u + o per group), which
GGUF's formats use too: 4-bit values are kept unsigned, u = q + 8, with o = -s · (8 + zero),
so that they pack two to a byte; 8-bit ones are q, with o = -s · zero where there are zero
points.

A GGUF converted in its native form (executor/gguf_to_hf.py) says `quant_method: "gguf"`:
its int8 values come with group scales and offsets already.

GPTQ (`quant_method: "gptq"`, AutoGPTQ's and GPTQModel's format) and AWQ (`"awq"`, AutoAWQ's
GEMM format) checkpoints hold, per Linear, unsigned values packed eight (4-bit) or four
(8-bit, GPTQ) to an int32, `qweight` [in, out] (GPTQ packs along the input, AWQ along the
output in its interleaved order), zero points `qzeros` packed along the output, and float16
`scales` [in / group, out]: W = s · (u - z). They load as GroupedWeight too: 4-bit values
as they are (0..15, packed two to a byte by the kernels), 8-bit ones less 128, with
o = -s · (z - that bias). GPTQ's original format stores z - 1 (`checkpoint_format` "gptq";
GPTQModel's "gptq_v2" stores z). Act-order checkpoints (`desc_act`) quantize the input columns
in order of their activations' magnitude, so that `g_idx` (each column's group) puts a group's
columns anywhere in the row. Here groups are runs of consecutive columns, so such a layer's
columns are sorted by group at load and its input is gathered in that order at run time
(`input_order`, a permutation the layer applies before its matmul; layers.Linear). This
is vLLM's way too; it costs one gather of each input per layer, not a copy of the weights.

Which layers are quantized is read from the tensors themselves: an int8 `weight` (with its
`weight_scale`) makes its Linear quantized (`Linear.checkpoint_w8a8`), a float one leaves it
float. That covers the config's `ignore` list (the LM head, typically) without matching its
names, which are transformers' module names, against ours. Anything else in a
quantization_config (another method, 2-bit or 16-bit ints, static activation scales, a KV
cache scheme other than static per-tensor fp8, sparsity) is refused at load, naming the field.
A static fp8 `kv_cache_scheme` is accepted: its scales are tensors that load with any
checkpoint (`<layer>.self_attn.k_scale`, models/weights.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.executor.models.layers import UnsupportedArchitectureError
from pagedserve.executor.models.weights import TensorTransform, WeightLoadError

SUPPORTED = ("compressed-tensors with int weights of 8 or 4 bits, per channel or per group, "
             "symmetric or with zero points, and no activation quantization (W8A16, W4A16) or, "
             "for symmetric per-channel int8 weights, dynamic per-token int8 activations "
             "(W8A8); or fp8 weights with dynamic per-token fp8 activations (FP8_DYNAMIC); "
             "GPTQ of 4 or 8 bits, act-order too; AWQ GEMM of 4 bits with zero points; "
             "GGUF")
# compressed-tensors formats of int weights: int8 tensors as they are, or values packed into
# int32s (pack-quantized, the only one for 4 bits).
FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
INT_WEIGHTS = {"type": "int", "dynamic": False}
# What W8A8 needs of its weights (the int8 kernels' scheme) and of its activations.
W8A8_WEIGHTS = {"num_bits": 8, "strategy": "channel", "symmetric": True}
INT8_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                          "dynamic": True}
# FP8_DYNAMIC: e4m3 weights, one scale per channel or per tensor, and per-token activations.
FP8_WEIGHTS = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
FP8_TOKEN_ACTIVATIONS = {**INT8_TOKEN_ACTIVATIONS, "type": "float"}
# A calibrated fp8 KV cache: one static scale for K and one for V per layer.
FP8_KV_SCALES = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                 "symmetric": True}


@dataclass(frozen=True)
class CheckpointQuantization:
    """A quantized checkpoint's scheme: its name (`--quantization`'s for the two it shares),
    and how compressed-tensors stores its weights."""

    scheme: str  # "int8" (W8A16), "w4a16", "w8a8_int8", "fp8", "gguf", "gptq" or "awq"
    num_bits: int = 8
    symmetric: bool = True
    # GPTQ and AWQ: input columns per group (-1: one group per row), and what the stored zero
    # points lack (1 in GPTQ's original format).
    group_size: int = -1
    zero_point_shift: int = 0
    # GPTQ's desc_act: columns quantized in order of activation size, groups given by g_idx.
    act_order: bool = False

    @property
    def dynamic_activations(self) -> bool:
        return self.scheme == "w8a8_int8"

    @property
    def int16_activations(self) -> bool:
        """Whether its grouped weights may be multiplied by activations rounded to 16-bit
        integers per group (`GroupedWeight.int16_activations`, near float32's precision): GGUF's,
        whose engines round activations further (llama.cpp's CPU kernels and vLLM's GGUF ones
        to 8 bits); the others as yet keep float activations (unmeasured there)."""
        return self.scheme == "gguf"


def checkpoint_quantization(config: Any) -> CheckpointQuantization | None:
    """The scheme of a transformers config's `quantization_config`; None without one. Raises
    UnsupportedArchitectureError naming the field that is not supported."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    method = quantization.get("quant_method")
    if method == "gguf":
        return CheckpointQuantization("gguf")
    if method == "gptq":
        return _gptq_scheme(quantization)
    if method == "awq":
        return _awq_scheme(quantization)
    if method != "compressed-tensors":
        _refuse(f"quantization_config.quant_method {method!r}")
    for field in ("sparsity_config", "transform_config"):
        if quantization.get(field):
            _refuse(f"quantization_config.{field}")
    kv_scheme = quantization.get("kv_cache_scheme")
    if kv_scheme:  # its scales are tensors, which load wherever they are (models/weights.py)
        _expect("quantization_config.kv_cache_scheme", kv_scheme, FP8_KV_SCALES)
    groups = quantization.get("config_groups") or {}
    if not groups:
        if kv_scheme:
            return None  # float weights, calibrated KV scales
        _refuse("a quantization_config without config_groups")
    schemes = {_group_scheme(f"quantization_config.config_groups.{name}", group,
                             quantization.get("format")) for name, group in groups.items()}
    if len(schemes) > 1:
        _refuse(f"config groups of different schemes ({', '.join(map(str, schemes))})")
    return schemes.pop()


def _group_scheme(where: str, group: dict, default_format: str | None) -> CheckpointQuantization:
    fmt = group.get("format") or default_format
    weights = group.get("weights") or {}
    if fmt == "float-quantized":
        return _fp8_scheme(where, group, weights)
    if fmt not in FORMATS:
        _refuse(f"{where}.format {fmt!r}")
    _expect(f"{where}.weights", weights, INT_WEIGHTS)
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    if bits not in (4, 8) or (bits == 4 and fmt != "pack-quantized"):
        _refuse(f"{where}.weights.num_bits {bits!r} (needs 8, or 4 pack-quantized)")
    if strategy not in ("channel", "group"):
        _refuse(f"{where}.weights.strategy {strategy!r} (needs 'channel' or 'group')")
    size = weights.get("group_size")
    if strategy == "group" and not (isinstance(size, int) and size > 0):
        _refuse(f"{where}.weights.group_size {size!r}")
    if weights.get("actorder") not in (None, "static"):  # "group": columns reordered
        _refuse(f"{where}.weights.actorder {weights['actorder']!r}")
    if group.get("output_activations"):
        _refuse(f"{where}.output_activations")
    symmetric = bool(weights.get("symmetric", True))
    activations = group.get("input_activations")
    if activations is None:
        return CheckpointQuantization("w4a16" if bits == 4 else "int8", bits, symmetric)
    _expect(f"{where}.weights", weights, W8A8_WEIGHTS)
    _expect(f"{where}.input_activations", activations, INT8_TOKEN_ACTIVATIONS)
    return CheckpointQuantization("w8a8_int8")


def _fp8_scheme(where: str, group: dict, weights: dict) -> CheckpointQuantization:
    _expect(f"{where}.weights", weights, FP8_WEIGHTS)
    if weights.get("strategy") not in ("channel", "tensor"):
        _refuse(f"{where}.weights.strategy {weights.get('strategy')!r} (fp8 needs 'channel' or "
                "'tensor')")
    if group.get("output_activations"):
        _refuse(f"{where}.output_activations")
    _expect(f"{where}.input_activations", group.get("input_activations") or {},
            FP8_TOKEN_ACTIVATIONS)
    return CheckpointQuantization("fp8")


def _gptq_scheme(config: dict) -> CheckpointQuantization:
    bits = config.get("bits")
    if bits not in (4, 8):
        _refuse(f"quantization_config.bits {bits!r} (GPTQ needs 4 or 8)")
    if config.get("dynamic"):  # GPTQModel's per-module overrides of bits and group size
        _refuse("quantization_config.dynamic")
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        _refuse(f"quantization_config.checkpoint_format {fmt!r} (needs 'gptq' or 'gptq_v2')")
    return CheckpointQuantization("gptq", bits, bool(config.get("sym", True)),
                                  _group_size(config, "group_size"),
                                  zero_point_shift=1 if fmt == "gptq" else 0,
                                  act_order=bool(config.get("desc_act", False)))


def _awq_scheme(config: dict) -> CheckpointQuantization:
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        _refuse(f"quantization_config.bits {bits!r} (AWQ needs 4)")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        _refuse(f"quantization_config.version {config.get('version')!r} (needs 'gemm')")
    if not config.get("zero_point", True):
        _refuse("quantization_config.zero_point false")
    key = "group_size" if "group_size" in config else "q_group_size"
    return CheckpointQuantization("awq", 4, False, _group_size(config, key))


def _group_size(config: dict, key: str) -> int:
    size = config.get(key)
    if not isinstance(size, int) or isinstance(size, bool) or not (size > 0 or size == -1):
        _refuse(f"quantization_config.{key} {size!r} (needs a positive int, or -1)")
    return size


def _expect(where: str, args: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if args.get(key) != value:
            _refuse(f"{where}.{key} {args.get(key)!r} (needs {value!r})")


def _refuse(what: str) -> None:
    raise UnsupportedArchitectureError(f"{what} is not supported (supported: {SUPPORTED})")


def checkpoint_transform(quantization: CheckpointQuantization) -> TensorTransform | None:
    """What the checkpoint's tensors need before the layers load them (None: nothing)."""
    if quantization.scheme in ("gguf", "fp8"):
        return None
    if quantization.scheme in ("gptq", "awq"):
        return PackedGroupsUnpacker(quantization)
    return CompressedTensorsUnpacker(quantization.num_bits, quantization.symmetric)


def _unpack_rows(packed: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """int32 words [rows, words], values densely packed along each row from bit 0, each value
    + 2^(bits - 1) -> the values [rows, words * 32 / bits] as int8: unsigned (0..15) for 4 bits,
    signed for 8."""
    if packed.dtype != torch.int32:
        raise WeightLoadError(f"{name}: dtype {packed.dtype}, expected int32 (values packed "
                              f"{32 // bits} to one)")
    data = packed.contiguous().view(torch.uint8)
    if bits == 8:
        return (data.to(torch.int16) - 128).to(torch.int8)
    return torch.stack([data & 15, data >> 4], dim=-1).reshape(data.shape[0], -1).to(torch.int8)


class CompressedTensorsUnpacker:
    """compressed-tensors' tensors as the Linears load them:
    - `weight_packed` (int32 [rows, cols * bits / 32]) becomes the int8 `weight` [rows, cols]
      (unsigned 4-bit values, signed 8-bit ones); `weight_shape` is dropped (the layer checks
      the shape anyway);
    - `weight_scale` passes, with a `weight_offset` of the same shape where the values are
      4-bit or have zero points: o = -s · (bias + zero), bias 8 for 4-bit values. A module's
      scale is held until its `weight_zero_point` (packed along rows for pack-quantized) has
      come too, whichever comes first.
    Other tensors pass as they are."""

    def __init__(self, bits: int, symmetric: bool):
        self.bits, self.symmetric = bits, symmetric
        self.held: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        module, _, param = name.rpartition(".")
        if param == "weight_shape":
            return []
        if param == "weight_packed":
            return [(f"{module}.weight", _unpack_rows(tensor, self.bits, name))]
        if param not in ("weight_scale", "weight_zero_point") or (
                self.bits == 8 and self.symmetric):
            return [(name, tensor)]
        parts = self.held.setdefault(module, {})
        parts[param] = tensor
        if "weight_scale" not in parts or (not self.symmetric
                                           and "weight_zero_point" not in parts):
            return []
        del self.held[module]
        scale = parts["weight_scale"].to(torch.float32)
        zero = torch.full_like(scale, 8.0 if self.bits == 4 else 0.0)
        if not self.symmetric:
            zero = zero + self._zero_points(f"{module}.weight_zero_point",
                                            parts["weight_zero_point"], scale.shape)
        return [(f"{module}.weight_scale", scale), (f"{module}.weight_offset", -scale * zero)]

    def _zero_points(self, name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Zero points as float32 of the scales' shape: int8 as they are, or int32 words packed
        along the rows (pack-quantized; the last word padded)."""
        if tensor.dtype == torch.int32:
            values = _unpack_rows(tensor.T, self.bits, name).T
            values = values[:shape[0]] - (8 if self.bits == 4 else 0)  # back to signed
        else:
            values = tensor
        if values.shape != shape:
            raise WeightLoadError(f"{name}: shape {tuple(tensor.shape)} does not match the "
                                  f"scales' {tuple(shape)}")
        return values.to(torch.float32)


def _unpack_words(words: torch.Tensor, bits: int, dim: int, name: str) -> torch.Tensor:
    """int32 words holding 32 / bits unsigned values each, from bit 0 up, packed along `dim`
    (0: a word holds consecutive rows; 1: consecutive columns) -> the values as int16."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise WeightLoadError(f"{name}: {words.dtype} of shape {tuple(words.shape)}, expected "
                              "a 2-d int32 tensor (packed values)")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (words.unsqueeze(1) >> shifts[:, None]) & mask  # [rows, per word, cols]
    else:
        values = (words.unsqueeze(2) >> shifts) & mask  # [rows, cols, per word]
    shape = list(words.shape)
    shape[dim] *= len(shifts)
    return values.reshape(shape).to(torch.int16)


# AWQ's GEMM format puts column 8c + ORDER[i] in the i-th 4 bits of word c; AWQ_COLUMNS is
# the inverse: which 4 bits of its word hold each column.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_COLUMNS = tuple(AWQ_ORDER.index(column) for column in range(8))
GPTQ_AWQ_TENSORS = ("qweight", "qzeros", "scales")


class PackedGroupsUnpacker:
    """GPTQ's and AWQ's tensors as the Linears load them: a module's `qweight`, `qzeros` and
    `scales` (held until all three have come, and GPTQ's `g_idx` too in an act-order
    checkpoint) become `weight` (int8 [out, in]), `weight_scale` and `weight_offset` (float32
    [out, groups]). A `g_idx` that puts groups out of order sorts the weight's columns by group
    and comes out first as `input_order` (the columns' order, int64 [in]); one in order is
    dropped. Other tensors pass as they are."""

    def __init__(self, quantization: CheckpointQuantization):
        self.quantization = quantization
        # Values are stored less this, so that 8-bit ones fit an int8.
        self.bias = 0 if quantization.num_bits == 4 else 128
        self.parts = GPTQ_AWQ_TENSORS + (("g_idx",) if quantization.act_order else ())
        self.held: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        module, _, param = name.rpartition(".")
        if param == "g_idx" and self.quantization.scheme == "gptq" \
                and not self.quantization.act_order:
            if self._input_order(name, tensor) is not None:
                raise UnsupportedArchitectureError(
                    f"{name}: input columns in groups out of order, where "
                    "quantization_config.desc_act is false")
            return []
        if param not in self.parts:
            return [(name, tensor)]
        parts = self.held.setdefault(module, {})
        parts[param] = tensor
        if len(parts) < len(self.parts):
            return []
        del self.held[module]
        values, zeros = self._values(module, parts)
        scales = parts["scales"].to(torch.float32)
        if values.shape[1] != scales.shape[1] or zeros.shape != scales.shape:
            raise WeightLoadError(
                f"{module}: qweight unpacks to {tuple(values.shape)} and qzeros to "
                f"{tuple(zeros.shape)}, which do not fit scales {tuple(scales.shape)}")
        self._check_group_count(module, values.shape[0], scales.shape[0])
        order = None
        if "g_idx" in parts:
            if parts["g_idx"].shape != values.shape[:1]:
                raise WeightLoadError(f"{module}.g_idx: shape {tuple(parts['g_idx'].shape)}, "
                                      f"expected ({values.shape[0]},): a group per input column")
            order = self._input_order(f"{module}.g_idx", parts["g_idx"])
        reordered = [] if order is None else [(f"{module}.input_order", order)]
        if order is not None:
            values = values[order]
        zeros = zeros.to(torch.float32) + self.quantization.zero_point_shift - self.bias
        weight = (f"{module}.weight", (values - self.bias).to(torch.int8).T.contiguous())
        if scales.shape[0] == 1 and not zeros.any():
            # Symmetric 8-bit values per channel: what `--quantization int8` makes, which the
            # int8 kernels run (per-channel scales, no offsets).
            return [weight, (f"{module}.weight_scale", scales[0])]
        return [*reordered, weight, (f"{module}.weight_scale", scales.T.contiguous()),
                (f"{module}.weight_offset", (-scales * zeros).T.contiguous())]

    def _values(self, module: str, parts: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The values [in, out] and the zero points [groups, out], unpacked."""
        bits = self.quantization.num_bits
        zeros = _unpack_words(parts["qzeros"], bits, 1, f"{module}.qzeros")
        if self.quantization.scheme == "gptq":
            return _unpack_words(parts["qweight"], bits, 0, f"{module}.qweight"), zeros
        values = _unpack_words(parts["qweight"], bits, 1, f"{module}.qweight")
        columns = list(AWQ_COLUMNS)
        return (values.unflatten(1, (-1, 8))[:, :, columns].flatten(1),
                zeros.unflatten(1, (-1, 8))[:, :, columns].flatten(1))

    def _check_group_count(self, module: str, columns: int, groups: int) -> None:
        size = self.quantization.group_size
        expected = 1 if size == -1 else -(-columns // size)
        if groups != expected:
            raise WeightLoadError(f"{module}: {groups} groups of scales for {columns} input "
                                  f"columns, where group_size {size} makes {expected}")

    def _input_order(self, name: str, g_idx: torch.Tensor) -> torch.Tensor | None:
        """The columns sorted by group (stable), None where they are in order already. Each
        group must hold group_size columns (the last what is left), as GPTQ makes them, so
        that sorted they are runs of consecutive columns."""
        size = self.quantization.group_size
        if g_idx.dim() != 1 or g_idx.dtype.is_floating_point:
            raise WeightLoadError(f"{name}: {g_idx.dtype} of shape {tuple(g_idx.shape)}, "
                                  "expected a 1-d int tensor (a group per input column)")
        groups = g_idx.to(torch.int64)
        columns = torch.arange(groups.numel(), dtype=torch.int64)
        in_order = torch.zeros_like(columns) if size == -1 else columns // size
        if torch.equal(groups, in_order):
            return None
        order = torch.sort(groups, stable=True).indices
        if not torch.equal(groups[order], in_order):
            raise WeightLoadError(f"{name}: groups of other sizes than group_size {size}")
        return order
