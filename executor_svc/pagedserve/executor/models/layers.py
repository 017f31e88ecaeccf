"""Building blocks shared by the model families, written for the flat paged batch.

A `Linear` may pack several checkpoint projections (q/k/v, gate/up) into one matmul, each
loaded into its slice. A checkpoint that stores q/k/v fused and interleaved per head (GPT-NeoX,
Falcon) is split at load time (`split_grouped_qkv`) so that every packed Linear holds its
projections contiguously. Under tensor parallelism (executor_svc/pagedserve/executor/parallel.py)
the model code names each projection's split: `ColumnParallelLinear` (each rank holds a slice of
every projection's output rows), `RowParallelLinear` (a slice of the input columns; partial sums
all-reduced), `VocabParallelEmbedding` and `ParallelLMHead` (vocabulary rows). Each layer cuts
its own slice out of the whole checkpoint tensor as it loads (`load_part`), so checkpoints are
the same for every tensor-parallel size.

The layers that call the executor's kernels (`KernelLayer`: norms, rotary, SiLU-and-mul, paged
attention) call them through `self.kernels`, the PyTorch set until `bind_kernels` gives the
whole model the set chosen for its device (kernels/pagedserve/kernels/dispatch.py); model code never
calls a kernel directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import structlog
import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.parallel import SINGLE, HeadSplit, TensorParallel
from pagedserve.kernels.activation import gelu
from pagedserve.kernels.attention import FP8_DTYPES, AttentionMetadata
from pagedserve.kernels.dispatch import TORCH_KERNELS, Kernels
from pagedserve.kernels.norm import layer_norm
from pagedserve.kernels.quantization import (
    METHODS,
    Fp8Weight,
    GroupedWeight,
    Int8Weight,
    QuantizedWeight,
    quantize_weight,
    tensor_bytes,
)

# A quantized checkpoint's tensors beside its `weight`, and the dtypes of quantized weights.
QUANTIZATION_TENSORS = ("weight_scale", "weight_offset")
# An act-order checkpoint's permutation of a quantized layer's input (Linear.input_order).
INPUT_ORDER = "input_order"
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)


log = structlog.get_logger(__name__)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture, or an option of its config, is not implemented."""


class KernelLayer(nn.Module):
    """A layer that runs one of the executor's kernels through `self.kernels`."""

    kernels: Kernels = TORCH_KERNELS


def rows_padded(tensor: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows `start` .. `start + rows` of `tensor`, zero-padded to `rows` where it ends first
    (the last rank's slice of a split that does not divide)."""
    piece = tensor[start:start + rows]
    if piece.shape[0] < rows:
        piece = torch.cat([piece, piece.new_zeros(rows - piece.shape[0], *piece.shape[1:])])
    return piece


class Linear(KernelLayer):
    """y = x W^T (+ b), with W the row-wise concatenation of `part_sizes` projections.

    A kernel set may repack W for its matmul (`Kernels.pack_linear`: on the CPU, bfloat16
    weights in the layout of our own matmul, kernels/pagedserve/kernels/csrc/bf16_linear.c, or
    oneDNN's blocked layout on other AVX-512 CPUs; on CPUs without AVX-512, float32 and
    bfloat16 weights for `float_linear` in csrc/int8_linear.c, in bfloat16 where that is exact;
    docs/performance.md has the figures); the plain copy is then released, and a tied
    embedding reads its rows from the packed copy (`rows`), unless that form cannot give them.

    `quantize` replaces W by int8 values and a scale per output channel
    (kernels/pagedserve/kernels/quantization.py), which the kernel set may repack too
    (`Kernels.pack_quantized`). A quantized checkpoint loads into that form directly: with
    `checkpoint_w8a8` set (not None: the checkpoint is quantized; True: its activations too),
    an int8 (or fp8) `weight` and its `weight_scale` load part by part
    (models/quantized_checkpoints.py). A scale of shape [rows] or [rows, 1] is per output
    channel (`Int8Weight`); [rows, K / g] is per group of g
    columns, with `weight_offset` of the same shape where the format has offsets
    (`GroupedWeight`: GGUF's block formats). Parts quantized in different group sizes (a GGUF
    whose v projection is Q6_K, groups of 16, and q and k Q4_K, groups of 32) share the finest.

    An act-order (GPTQ desc_act) checkpoint stores its groups' columns anywhere in the row;
    they load sorted by group, with `input_order` (the checkpoint's column of each stored
    column), and the input is gathered in that order before the matmul
    (models/quantized_checkpoints.py). The parts of a packed layer share their input, so they
    must share the order (GPTQ quantizes them from the same activations: they do)."""

    packed: object | None = None  # Kernels.pack_linear's form of W, when the set repacks it
    # The quantized weight, in the form the bound kernel set multiplies by.
    quantized: QuantizedWeight | None = None
    # A quantized checkpoint's scheme (True: W8A8, False: weight-only); None: a float checkpoint.
    checkpoint_w8a8: bool | None = None
    # Whether a float weight part was loaded (a layer's parts are all float or all quantized).
    _float_weight_loaded: bool = False

    def __init__(self, in_features: int, part_sizes: Sequence[int], bias: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.part_sizes = list(part_sizes)
        self.in_features = in_features
        out_features = sum(part_sizes)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.register_buffer(INPUT_ORDER, None, persistent=False)
        # The parts whose quantized weight, and whose input order, have loaded.
        self._weight_parts: set[int] = set()
        self._ordered_parts: set[int] = set()

    @property
    def checkpoint_in_features(self) -> int:
        """The input size of the whole projection in the checkpoint."""
        return self.in_features

    def load_part(self, part: int, param_name: str, tensor: torch.Tensor) -> None:
        """Copy a whole checkpoint projection (`part` of the packed ones) into this layer's
        share of it."""
        if part >= len(self.part_sizes):
            raise ValueError(f"part {part}: the layer has {len(self.part_sizes)} parts")
        if param_name == INPUT_ORDER:
            self._load_input_order(part, tensor)
            return
        if param_name == "weight_scale" and tensor.numel() == 1:  # one for the whole tensor
            tensor = tensor.reshape(1).expand(self.checkpoint_rows(part))
        if param_name in QUANTIZATION_TENSORS or (param_name == "weight"
                                                  and tensor.dtype in QUANTIZED_DTYPES):
            target, tensor = self._quantized_target(param_name, tensor)
            if param_name == "weight":
                if self.input_order is not None and part not in self._ordered_parts:
                    raise ValueError(f"part {part} in its columns' order, where the layer's "
                                     "other projections, which share its input, are act-order")
                self._weight_parts.add(part)
        else:
            param = getattr(self, param_name, None) if param_name in ("weight", "bias") else None
            if param is None:
                raise ValueError(f"part {part}: the layer has no {param_name}")
            if param_name == "weight":
                if self.quantized is not None:
                    raise ValueError(f"weight of dtype {tensor.dtype} in a layer whose other "
                                     "projections are int8")
                self._float_weight_loaded = True
            target = param.data
        expected = self.checkpoint_shape(part, param_name)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{param_name} part {part}: checkpoint shape {tuple(tensor.shape)}, "
                             f"model expects {expected}")
        start = sum(self.part_sizes[:part])
        target[start:start + self.part_sizes[part]].copy_(self.shard(part, param_name, tensor))

    def _load_input_order(self, part: int, order: torch.Tensor) -> None:
        """An act-order part's column order (a permutation of the checkpoint's input columns),
        which comes before its weight, as this rank applies it."""
        columns = self.checkpoint_in_features
        if self.checkpoint_w8a8 is None:
            raise ValueError(f"{INPUT_ORDER} in a checkpoint whose config.json has no "
                             "quantization_config")
        if order.dim() != 1 or order.dtype != torch.int64 or not torch.equal(
                order.sort().values, torch.arange(columns)):
            raise ValueError(f"{INPUT_ORDER} part {part}: expected a permutation of the "
                             f"{columns} input columns")
        order = self.local_input_order(order)
        if self.input_order is None:
            if self._weight_parts:
                raise ValueError(f"part {part} is act-order, where the layer's other "
                                 "projections, which share its input, are in order")
            self.input_order = order
        elif not torch.equal(order, self.input_order):
            raise ValueError(f"part {part}: act-order unlike the layer's other projections, "
                             "which share its input (g_idx differs)")
        self._ordered_parts.add(part)

    def local_input_order(self, order: torch.Tensor) -> torch.Tensor:
        """The order of this rank's input columns (all of them here)."""
        return order

    def _quantized_target(self, param_name: str, tensor: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a quantized checkpoint's int8 weight, its scales or offsets go (the storage made
        on the first of them), and the tensor in that storage's group size."""
        if self.checkpoint_w8a8 is None:
            raise ValueError(f"{param_name} of dtype {tensor.dtype}: int8 tensors in a checkpoint "
                             "whose config.json has no quantization_config")
        if self._float_weight_loaded:
            raise ValueError(f"{param_name}: a quantized tensor in a layer whose other "
                             "projections are float")
        if self.quantized is None:
            rows = sum(self.part_sizes)
            # compressed-tensors quantizes activations with 127.5 levels (quantization.py).
            self.quantized = Int8Weight(torch.zeros(rows, self.in_features, dtype=torch.int8),
                                        torch.zeros(rows, dtype=torch.float32),
                                        self.checkpoint_w8a8, activation_levels=127.5)
        if tensor.dtype == torch.float8_e4m3fn and not isinstance(self.quantized, Fp8Weight):
            # fp8 values: the storage becomes fp8 (its scales kept: a checkpoint's layers are
            # all of one scheme).
            self.quantized = Fp8Weight(torch.zeros_like(self.quantized.qweight,
                                                        dtype=torch.float8_e4m3fn),
                                       self.quantized.scales)
        if param_name == "weight":
            return self.quantized.qweight, tensor
        if tensor.dim() == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]  # compressed-tensors stores per-channel scales as [rows, 1]
        if tensor.dim() == 2:
            tensor = self._in_groups(param_name, tensor)
        elif param_name == "weight_offset" or isinstance(self.quantized, GroupedWeight):
            tensor = self._in_groups(param_name, tensor[:, None])  # per channel: one group
        if param_name == "weight_offset":
            if self.quantized.offsets is None:
                self.quantized = dataclasses.replace(
                    self.quantized, offsets=torch.zeros_like(self.quantized.scales))
            return self.quantized.offsets, tensor
        return self.quantized.scales, tensor.to(torch.float32)

    def _in_groups(self, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint's per-group `tensor` [rows, groups] as the layer's groups: the storage
        turns grouped (per-channel scales become groups of one value each) and finer where
        `tensor`'s groups are, and `tensor` is repeated to the storage's group size."""
        columns = self.checkpoint_in_features
        if isinstance(self.quantized, Fp8Weight):
            raise ValueError(f"{param_name}: fp8 weights take one scale per channel or tensor")
        if tensor.dim() != 2 or not tensor.shape[1] or columns % tensor.shape[1]:
            raise ValueError(f"{param_name} of shape {tuple(tensor.shape)}: expected [rows] or "
                             f"[rows, groups] with the groups dividing {columns} columns")
        group = columns // tensor.shape[1]
        current = self.quantized
        held = columns if isinstance(current, Int8Weight) else current.group_size
        finest = math.gcd(group, held)
        if self.in_features % finest:
            raise ValueError(f"{param_name}: groups of {finest} columns do not divide this "
                             f"rank's {self.in_features} columns")
        if isinstance(current, Int8Weight):
            if current.dynamic_activations:
                raise ValueError(f"{param_name}: group scales with quantized activations")
            self.quantized = GroupedWeight(
                current.qweight, current.scales[:, None].repeat(1, self.in_features // finest))
        elif finest != current.group_size:
            repeat = current.group_size // finest
            self.quantized = GroupedWeight(
                current.qweight, current.scales.repeat_interleave(repeat, dim=1),
                None if current.offsets is None
                else current.offsets.repeat_interleave(repeat, dim=1))
        return tensor.to(torch.float32).repeat_interleave(group // finest, dim=1)

    def checkpoint_shape(self, part: int, param_name: str) -> tuple[int, ...]:
        """The shape of projection `part`'s tensor in the checkpoint (group scales and offsets
        once in the layer's group size)."""
        rows = self.checkpoint_rows(part)
        if param_name == "weight":
            return rows, self.checkpoint_in_features
        if param_name in QUANTIZATION_TENSORS and isinstance(self.quantized, GroupedWeight):
            return rows, self.checkpoint_in_features // self.quantized.group_size
        return (rows,)

    def checkpoint_rows(self, part: int) -> int:
        return self.part_sizes[part]

    def shard(self, part: int, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a checkpoint tensor of `checkpoint_shape` (all of it here)."""
        return tensor

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` and the like move the quantized weight too (a plain attribute, which
        nn.Module does not see), in its form and dtypes."""
        super()._apply(fn, recurse)
        if self.quantized is not None:
            self.quantized = _moved(self.quantized, fn)
        return self

    def quantize(self, method: str, shared: bool) -> None:
        """W quantized per output channel as `--quantization method` does it (int8, w8a8_int8,
        fp8); the float copy is released unless another module shares it. Call before
        `use_kernels`."""
        self.quantized = quantize_weight(self.weight.data, method)
        if not shared:
            self.weight.data = self.weight.data.new_empty(0)

    def use_kernels(self, kernels: Kernels, tied: VocabParallelEmbedding | None) -> None:
        """Multiply by `kernels`, in the form they pack W in. The plain weight is released
        once packed; `tied` (the embedding that shares W) then reads its rows from the packed
        form where that form reads rows (ours do; oneDNN's does not: W is then kept for it)."""
        self.kernels = kernels
        if self.quantized is not None:
            plain = self.quantized.plain()
            self.quantized = (kernels.pack_quantized(plain) if kernels.pack_quantized
                              else plain)
            return
        weight = self.weight if self.packed is None else self.packed.to_dense()
        self.packed = kernels.pack_linear(weight) if kernels.pack_linear else None
        reads_rows = callable(getattr(self.packed, "rows", None))
        # The parameter stays (its dtype and name are read), empty while the packed copy serves.
        released = self.packed is not None and (tied is None or reads_rows)
        self.weight.data = weight.new_empty(0) if released else weight
        if tied is not None:
            # A plain attribute, not a submodule: the head is the model's, not the embedding's.
            object.__setattr__(tied, "tied_head", self if released else None)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of W in `dtype` (a tied embedding's lookup), from the form this layer
        multiplies by."""
        return (self.packed if self.quantized is None else self.quantized).rows(ids, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ `bias`), by the int8 weight when quantized, by the packed weight when the
        kernel set repacked it."""
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        if self.quantized is not None:
            return self.kernels.quantized_linear(x, self.quantized, bias)
        if self.packed is not None:
            return self.kernels.packed_linear(x, self.packed, bias)
        return nn.functional.linear(x, self.weight, bias)


class ColumnParallelLinear(Linear):
    """Each rank holds the slice `rank * pieces // size` of every projection's output rows, in
    `pieces` slices (by default one per rank; fewer for replicated KV heads). The output stays
    split: the next layer works on its slice (its heads, its intermediate features). A
    projection that does not divide is zero-padded (the vocabulary of an LM head: the padded
    logits are dropped); model code checks the splits that must be exact (heads, MLP)."""

    def __init__(self, in_features: int, part_sizes: Sequence[int], bias: bool,
                 dtype: torch.dtype, tp: TensorParallel = SINGLE,
                 part_pieces: Sequence[int] | None = None):
        self.checkpoint_part_sizes = list(part_sizes)
        self.part_pieces = list(part_pieces or [tp.size] * len(part_sizes))
        super().__init__(in_features, [-(-n // pieces) for n, pieces in
                                       zip(part_sizes, self.part_pieces, strict=True)],
                         bias, dtype)
        self.tp = tp

    def checkpoint_rows(self, part: int) -> int:
        return self.checkpoint_part_sizes[part]

    def shard(self, part: int, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.part_sizes[part]
        return rows_padded(tensor, self.tp.rank * self.part_pieces[part] // self.tp.size * rows,
                           rows)


class RowParallelLinear(Linear):
    """Each rank holds its slice of the input columns and computes a partial sum, all-reduced;
    the bias is added once, after the sum. With `reduce=False` the caller all-reduces (a layer
    whose attention and MLP outputs are summed reduces the sum once): the partial sum is
    returned, the bias added on rank 0 alone so that the reduction counts it once."""

    def __init__(self, in_features: int, part_sizes: Sequence[int], bias: bool,
                 dtype: torch.dtype, tp: TensorParallel = SINGLE, reduce: bool = True):
        super().__init__(tp.split(in_features, "a row-parallel layer's input size"),
                         part_sizes, bias, dtype)
        self.tp, self.reduce = tp, reduce
        self.gathers_input = False  # every rank's input gathered first (local_input_order)

    @property
    def checkpoint_in_features(self) -> int:
        return self.in_features * self.tp.size

    def local_input_order(self, order: torch.Tensor) -> torch.Tensor:
        """The order of this rank's columns. Each rank holds its slice of the stored columns,
        which are sorted by group: whole groups, the same share of the weight on every rank.
        Where every rank's slice comes from its own slice of the input, the order is local.
        Otherwise (act-order groups span ranks, as in most act-order checkpoints) every rank
        all-gathers the layer's input before its matmul and picks its columns from the whole:
        one more collective of [tokens, input] per step, where the alternative, each rank
        holding the columns of its own input slice, leaves partial groups that our kernels,
        which take groups of equal size, cannot run without padding every group on every rank
        (up to the whole layer's values on each). The decision reads the whole order, so that
        every rank takes it alike (a collective that some ranks skip would hang the group)."""
        if self.tp.size == 1:
            return order
        columns = self.in_features
        ranks = order.reshape(self.tp.size, columns) // columns
        if torch.equal(ranks, torch.arange(self.tp.size).unsqueeze(1).expand_as(ranks)):
            start = self.tp.rank * columns
            return order[start:start + columns] - start
        self.gathers_input = True
        return order[self.tp.rank * columns:(self.tp.rank + 1) * columns]

    def shard(self, part: int, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Its columns of the weight and of group scales and offsets; the bias and the per-row
        scales whole (each rank's partial sum is scaled by its rows' scales, so the sum of them
        is the whole layer's)."""
        if tensor.dim() == 1:
            return tensor
        columns = tensor.shape[1] // self.tp.size
        return tensor[:, self.tp.rank * columns:(self.tp.rank + 1) * columns]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._matmul(x, self.bias)
        if self.gathers_input:
            x = self.tp.all_gather_last_dim(x)
        y = self._matmul(x, None)
        if self.reduce:
            y = self.tp.all_reduce(y)
        elif not self.tp.is_first:
            return y
        return y if self.bias is None else y + self.bias


class ParallelLMHead(ColumnParallelLinear):
    """The output head, split by vocabulary rows (as `VocabParallelEmbedding`, so that a tied
    head shares its weight)."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__(hidden_size, [vocab_size], False, dtype, tp)
        self.vocab_size = vocab_size

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [rows, vocab_size] on rank 0, which samples; None on the others."""
        logits = self.tp.gather_last_dim(self(hidden))
        return None if logits is None else logits[:, :self.vocab_size].float()


class CausalLM(nn.Module):
    """A family's model: its decoder stack and its output head, under the names its checkpoint
    uses (`stack_name`: model, transformer, gpt_neox; `head_name`: lm_head, embed_out), the head
    tied to the stack's token embedding (`embedding_name`) where the config says. Families
    build their stack in `build_model`."""

    stack_name = "model"
    head_name = "lm_head"
    embedding_name = "embed_tokens"

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        stack = self.build_model(config, dtype, tp)
        setattr(self, self.stack_name, stack)  # first: a tied weight keeps the stack's name
        head = ParallelLMHead(config.hidden_size, config.vocab_size, dtype, tp)
        setattr(self, self.head_name, head)
        if config.tie_word_embeddings:
            head.weight = getattr(stack, self.embedding_name).weight

    def build_model(self, config: PretrainedConfig, dtype: torch.dtype,
                    tp: TensorParallel) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of the flat batch."""
        return getattr(self, self.stack_name)(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits of the rows of `hidden` that sample (on rank 0; None on the others)."""
        return getattr(self, self.head_name).logits(hidden)


# A quantized weight in any kernel set's form.
Packed = TypeVar("Packed")


def _moved(weight: Packed, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
    """`weight` (a quantized weight in any kernel set's form: a dataclass of tensors, and of
    such dataclasses) with every tensor through `fn` (a device move) and kept in its dtype, as
    the kernels read it: a packed form moves packed (`bootstrap` packs on the host, then
    moves)."""
    moved = {}
    for field in dataclasses.fields(weight):
        value = getattr(weight, field.name)
        if isinstance(value, torch.Tensor):
            moved[field.name] = fn(value).to(value.dtype)
        elif dataclasses.is_dataclass(value):
            moved[field.name] = _moved(value, fn)
    return dataclasses.replace(weight, **moved)


class VocabParallelEmbedding(nn.Module):
    """Token embeddings, each rank holding ceil(vocab / size) rows (the last zero-padded): a
    rank embeds the tokens in its rows, zeros the others, and the ranks' results are summed.

    A quantized checkpoint's int8 embedding (a GGUF run natively) keeps its values and group
    factors: `quantized`, this rank's rows, assembled once loaded (`finish_quantized_loading`),
    whose looked-up rows are dequantized. A tied output head then multiplies by that same
    weight, and the embedding reads its rows from the head (`tied_head`, in whatever form the
    kernel set packed it), so the weight is held once. So does a float embedding whose tied
    head's weight the kernel set repacked (`Linear.use_kernels`)."""

    quantized: GroupedWeight | None = None
    tied_head: Linear | None = None
    # As Linear.checkpoint_w8a8: not None where the checkpoint may hold int8 tensors.
    checkpoint_w8a8: bool | None = None

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.rows = -(-vocab_size // tp.size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, dtype=dtype),
                                   requires_grad=False)
        # A quantized checkpoint's tensors by name, this rank's rows, until assembled.
        self._quantized_parts: dict[str, torch.Tensor] = {}

    def load_part(self, part: int, param_name: str, tensor: torch.Tensor) -> None:
        quantized = param_name in QUANTIZATION_TENSORS or tensor.dtype == torch.int8
        columns = self.weight.shape[1]
        if part or param_name not in ("weight", *QUANTIZATION_TENSORS) or tensor.dim() != 2 \
                or tensor.shape[0] != self.vocab_size \
                or (param_name == "weight" and tensor.shape[1] != columns):
            raise ValueError(f"{param_name}: checkpoint shape {tuple(tensor.shape)}, model "
                             f"expects weight {(self.vocab_size, columns)}")
        piece = rows_padded(tensor, self.tp.rank * self.rows, self.rows)
        if not quantized:
            self.weight.data.copy_(piece)
        elif self.checkpoint_w8a8 is None:
            raise ValueError(f"{param_name} of dtype {tensor.dtype}: int8 tensors in a checkpoint "
                             "whose config.json has no quantization_config")
        else:
            self._quantized_parts[param_name] = piece

    def assemble_quantized(self) -> bool:
        """The loaded int8 values and group factors as `quantized`; False if none loaded."""
        parts, self._quantized_parts = self._quantized_parts, {}
        if not parts:
            return False
        scales = parts.get("weight_scale")
        if "weight" not in parts or scales is None or self.weight.shape[1] % scales.shape[1]:
            raise ValueError(f"a quantized embedding needs int8 weight and weight_scale [rows, "
                             f"groups dividing {self.weight.shape[1]}], got {sorted(parts)}")
        offsets = parts.get("weight_offset")
        self.quantized = GroupedWeight(parts["weight"], scales.to(torch.float32),
                                       None if offsets is None else offsets.to(torch.float32))
        return True

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.quantized is not None:
            self.quantized = _moved(self.quantized, fn)
        return self

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (of this rank's) of the embedding."""
        if self.tied_head is not None:
            return self.tied_head.rows(ids, self.weight.dtype)
        if self.quantized is not None:
            return self.quantized.rows(ids, self.weight.dtype)
        return nn.functional.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._embed(input_ids)
        local = input_ids - self.tp.rank * self.rows
        outside = (local < 0) | (local >= self.rows)
        x = self._embed(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))


def qkv_projection(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   bias: bool, dtype: torch.dtype,
                   tp: TensorParallel) -> tuple[ColumnParallelLinear, HeadSplit]:
    """q, k and v packed into one column-parallel Linear, each rank holding its heads."""
    heads = tp.split_heads(num_heads, num_kv_heads)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    return ColumnParallelLinear(hidden_size, [q_size, kv_size, kv_size], bias, dtype, tp,
                                [tp.size, heads.kv_pieces, heads.kv_pieces]), heads


def _shared_with_other_modules(model: nn.Module) -> set[int]:
    """ids of the parameters that modules other than Linears hold too (a tied embedding)."""
    return {id(p) for m in model.modules() if not isinstance(m, Linear)
            for p in m.parameters(recurse=False)}


def bind_kernels(model: nn.Module, kernels: Kernels) -> None:
    embeddings = {id(m.weight): m for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding)}
    for module in model.modules():
        if isinstance(module, Linear):
            module.use_kernels(kernels, tied=embeddings.get(id(module.weight)))
        elif isinstance(module, KernelLayer):
            module.kernels = kernels


def weight_bytes(model: nn.Module) -> int:
    """The bytes the model's weights take as they serve: parameters, the kernel set's packed
    copies and int8 weights (a tensor held twice counted once)."""
    tensors = {id(t): t for t in model.parameters()}
    total = 0
    for module in model.modules():
        if isinstance(module, (Linear, VocabParallelEmbedding)) and module.quantized is not None:
            total += module.quantized.nbytes
            order = getattr(module, INPUT_ORDER, None)
            total += 0 if order is None else tensor_bytes(order)
        elif isinstance(module, Linear) and module.packed is not None:
            total += module.packed.nbytes  # a packed copy is the module's own
    return total + tensor_bytes(*tensors.values())


def finish_quantized_loading(model: nn.Module, int16_activations: bool = False) -> None:
    """Once a quantized checkpoint has loaded: each quantized embedding assembles its weight and
    hands it to the output head that shares it (tied), and the float weights of quantized
    layers are released, unless another module still uses them (a float tied embedding).
    `int16_activations`: the layers' grouped weights may be multiplied by activations rounded
    to 16-bit integers (`GroupedWeight.int16_activations`; the checkpoint's scheme says)."""
    heads = {id(m.weight): m for m in model.modules() if isinstance(m, Linear)}
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and module.assemble_quantized():
            head = heads.get(id(module.weight))
            if head is not None:
                head.quantized, module.quantized = module.quantized, None
                # A plain attribute, not a submodule: the head is the model's, not this one's.
                object.__setattr__(module, "tied_head", head)
            module.weight.data = module.weight.data.new_empty(0)
    shared = _shared_with_other_modules(model)
    for module in model.modules():
        if not isinstance(module, Linear) or module.quantized is None:
            continue
        if int16_activations and isinstance(module.quantized, GroupedWeight):
            module.quantized = dataclasses.replace(module.quantized, int16_activations=True)
        if id(module.weight) not in shared:
            module.weight.data = module.weight.data.new_empty(0)


def quantize_linears(model: nn.Module, scheme: str) -> None:
    """Every Linear's weight, the LM head's included, quantized per output channel under
    `scheme` (a name of quantization.METHODS, as --quantization takes it); embeddings and norms
    keep the model's dtype. Call before `bind_kernels`. Under tensor parallelism each rank
    quantizes its own slice (a row-parallel layer's scales cover the rank's columns)."""
    if scheme not in METHODS:
        raise ValueError(f"quantization {scheme!r} is not one of {', '.join(METHODS)}")
    shared = _shared_with_other_modules(model)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize(scheme, shared=id(module.weight) in shared)
    model.quantization = scheme


class RMSNorm(KernelLayer):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: the normed x. With it: (normed x + residual, x + residual)."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(size, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class Rotary(KernelLayer):
    """Rotary position embedding of q and k (neox style: rotate-half), on the first
    cos_sin.shape[-1] channels of each head."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.kernels.apply_rotary(q, positions, cos_sin),
                self.kernels.apply_rotary(k, positions, cos_sin))


class SiluAndMul(KernelLayer):
    """[..., 2 * d] (gate then up) -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(x)


class ActAndMul(nn.Module):
    """[..., 2 * d] (gate then up) -> act(gate) * up, for gates other than SiLU (GeGLU)."""

    def __init__(self, name: str):
        super().__init__()
        self.act = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


# Hugging Face activation names (`hidden_act`, `activation`) -> function. The tanh-approximated
# variants differ from each other only in how they spell the same formula.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu,
    "gelu_new": partial(gelu, approximate="tanh"),
    "gelu_fast": partial(gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(gelu, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def split_grouped_qkv(fused: torch.Tensor, num_kv_heads: int,
                      head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused q/k/v weight or bias whose rows are grouped per KV head (the group's query
    heads, then its key head, then its value head) into q, k and v, each with its heads
    contiguous. This one layout covers GPT-NeoX and multi-head Falcon ([heads, 3, head_dim]),
    multi-query Falcon ([heads + 2, head_dim]) and Falcon's grouped decoder
    ([kv_heads, heads / kv_heads + 2, head_dim])."""
    rows = fused.shape[0]
    group_rows = rows // num_kv_heads if num_kv_heads else 0
    if not group_rows or rows % num_kv_heads or group_rows % head_dim \
            or group_rows // head_dim < 3:
        raise ValueError(f"fused q/k/v of {rows} rows does not split into {num_kv_heads} KV "
                         f"groups of query, key and value heads of size {head_dim}")
    grouped = fused.reshape(num_kv_heads, group_rows // head_dim, head_dim, *fused.shape[1:])
    q = grouped[:, :-2].reshape(-1, *fused.shape[1:])
    k = grouped[:, -2].reshape(-1, *fused.shape[1:])
    v = grouped[:, -1].reshape(-1, *fused.shape[1:])
    return q, k, v


class PagedAttention(KernelLayer):
    """Writes the step's K/V into this layer's paged cache, then attends through block tables.
    The runner binds the cache tensors once, after allocating them (`bind_kv_caches`). An fp8
    cache stores K / k_scale and V / v_scale (kernels/pagedserve/kernels/attention.py); the
    scales are 1 unless a checkpoint gives them."""

    k_scale: float = 1.0
    v_scale: float = 1.0
    # A calibrated checkpoint's scales (models/weights.py), used once an fp8 cache is bound.
    checkpoint_k_scale: float = 1.0
    checkpoint_v_scale: float = 1.0

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None, scale: float | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale  # of q . k
        self.softcap = softcap  # scaled scores s become softcap * tanh(s / softcap)
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        key_cache, value_cache = self.kv_cache
        self.kernels.write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping,
                                    k_scale=self.k_scale, v_scale=self.v_scale)
        out = self.kernels.paged_attention(q, key_cache, value_cache, meta, self.scale,
                                           self.sliding_window, k_scale=self.k_scale,
                                           v_scale=self.v_scale, softcap=self.softcap,
                                           fresh_kv=(k, v))
        return out.reshape(q.shape[0], -1)


def bind_kv_caches(model: nn.Module, caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    if len(layers) != len(caches):
        raise ValueError(f"{len(caches)} KV caches for {len(layers)} attention layers")
    fp8 = caches and caches[0][0].dtype in FP8_DTYPES.values()
    ignored = 0
    for layer, cache in zip(layers, caches, strict=True):
        layer.kv_cache = cache
        # A checkpoint's KV scales are for an fp8 cache; others store K and V as they are.
        scales = (layer.checkpoint_k_scale, layer.checkpoint_v_scale)
        layer.k_scale, layer.v_scale = scales if fp8 else (1.0, 1.0)
        ignored += not fp8 and scales != (1.0, 1.0)
    if ignored:
        log.warning("the checkpoint's KV cache scales apply to an fp8 cache only: unused",
                    layers=ignored, kv_cache_dtype=str(caches[0][0].dtype))


def attention_window(*models: nn.Module) -> int:
    """The longest sliding window of the models' attention layers; 0 where any layer attends
    to every position (KvCacheInfo.sliding_window: what the scheduler may release)."""
    windows = [m.sliding_window for model in models for m in model.modules()
               if isinstance(m, PagedAttention)]
    return 0 if not windows or None in windows else max(windows)


def kv_cache_shape(model: nn.Module, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
    """Shape of each attention layer's K (and V) cache."""
    return [(num_blocks, block_size, m.num_kv_heads, m.head_dim)
            for m in model.modules() if isinstance(m, PagedAttention)]
