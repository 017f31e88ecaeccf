"""Mixture-of-experts feed-forward for the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE): a
router picks each token's top-k experts, the experts' gated MLPs run as one kernel call
(`Kernels.fused_moe`: a loop over experts on the CPU, a grouped GEMM in Triton), and where the
family has one a shared expert runs on every token, gated by a sigmoid.

Tensor parallelism slices every expert the Megatron way (each rank holds its share of every
expert's intermediate features, as vLLM does by default), so ranks route identically, compute
their partial sums and all-reduce them once; the router and the shared expert's gate are whole
on every rank.

Checkpoints store one tensor per expert and projection (`...experts.<e>.<proj>.weight`, as the
Hub ships Mixtral and the Qwen MoEs and as transformers saves them); `ExpertStacker` gathers a
layer's experts into the stacked [experts, ...] tensors the kernel reads, once its last one
has arrived. The stacked form transformers 5 holds in memory (`experts.gate_up_proj`,
`experts.down_proj`) loads as it is."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.executor.models.layers import KernelLayer, UnsupportedArchitectureError
from pagedserve.executor.models.llama import LlamaMLP
from pagedserve.executor.models.weights import WeightLoadError
from pagedserve.executor.parallel import TensorParallel

EXPERT_TENSOR = re.compile(r"(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")


class ExpertWeights(KernelLayer):
    """Every expert's gate/up rows (`w13`: [experts, 2 * intermediate, hidden]) and down
    projection (`w2`: [experts, hidden, intermediate]), this rank's intermediate slice."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype,
                 tp: TensorParallel, size_field: str):
        super().__init__()
        self.local = tp.split(intermediate, size_field)
        self.tp = tp
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local, hidden, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.local, dtype=dtype),
                               requires_grad=False)

    def load_part(self, part: int, param_name: str, tensor: torch.Tensor) -> None:
        """A whole stacked checkpoint tensor (every expert, every feature) into this rank's
        slice."""
        if param_name not in ("w13", "w2"):
            raise ValueError(f"the experts have no {param_name}")
        if not tensor.dtype.is_floating_point or tensor.element_size() == 1:  # int8, fp8
            raise ValueError(f"{param_name}: quantized experts ({tensor.dtype}) are not "
                             "supported")
        param = getattr(self, param_name)
        whole = list(param.shape)
        whole[1 if param_name == "w13" else 2] *= self.tp.size
        if list(tensor.shape) != whole:
            raise ValueError(f"{param_name}: checkpoint shape {tuple(tensor.shape)}, model "
                             f"expects {tuple(whole)}")
        start, local = self.tp.rank * self.local, self.local
        if param_name == "w13":
            gate, up = tensor.chunk(2, dim=1)
            piece = torch.cat([gate[:, start:start + local], up[:, start:start + local]], dim=1)
        else:
            piece = tensor[:, :, start:start + local]
        param.data.copy_(piece)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum of the routed experts' outputs."""
        return self.kernels.fused_moe(x, self.w13, self.w2, weights, ids,
                                      self.kernels.silu_and_mul)


class SparseMoeBlock(nn.Module):
    """Router, experts and, where `shared_size_field` names the config's field, a shared
    expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: TensorParallel, *,
                 num_experts: int, size_field: str, renormalize: bool,
                 shared_size_field: str | None = None):
        super().__init__()
        if config.hidden_act != "silu":
            raise UnsupportedArchitectureError(
                f"hidden_act {config.hidden_act!r}: the experts support silu only")
        hidden = config.hidden_size
        self.top_k, self.renormalize, self.tp = config.num_experts_per_tok, renormalize, tp
        if not 0 < self.top_k <= num_experts:
            raise UnsupportedArchitectureError(
                f"num_experts_per_tok {self.top_k} is not in [1, {num_experts}]")
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        self.experts = ExpertWeights(num_experts, hidden, getattr(config, size_field), dtype,
                                     tp, size_field)
        self.shared_expert = self.shared_expert_gate = None
        if shared_size_field is not None and getattr(config, shared_size_field, 0):
            self.shared_expert = LlamaMLP(config, dtype, tp, size_field=shared_size_field)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, dtype=dtype)
        for param in self.parameters():
            param.requires_grad_(False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights (float32): the softmax over all
        experts, renormalised over the k where the family does."""
        probs = self.gate(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self.tp.all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class ExpertStacker:
    """A model's checkpoint hook for expert tensors: `__call__` returns None for a tensor that
    is not one expert's projection, [] while its layer waits for more experts, and the layer's
    stacked `w13` or `w2` once the last one has arrived. `projections` maps the checkpoint's
    projection names to (our tensor, part): w13's part 0 is the gate, 1 the up projection."""

    def __init__(self, num_experts: int, projections: dict[str, tuple[str, int]]):
        self.num_experts, self.projections = num_experts, projections
        self.pending: dict[tuple[str, str], dict[tuple[int, int], torch.Tensor]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        for stacked, ours in ((".experts.gate_up_proj", "w13"), (".experts.down_proj", "w2")):
            if name.endswith(stacked):  # transformers 5's in-memory form, stacked already
                return [(f"{name.removesuffix(stacked)}.experts.{ours}", tensor)]
        match = EXPERT_TENSOR.fullmatch(name)
        if match is None or match["proj"] not in self.projections:
            return None
        expert = int(match["expert"])
        if expert >= self.num_experts:
            raise WeightLoadError(f"{name}: expert {expert}, but the config has "
                                  f"{self.num_experts}")
        ours, part = self.projections[match["proj"]]
        got = self.pending.setdefault((match["prefix"], ours), {})
        got[expert, part] = tensor
        parts = 2 if ours == "w13" else 1
        if len(got) < self.num_experts * parts:
            return []
        del self.pending[match["prefix"], ours]
        try:
            stacked = torch.stack([torch.cat([got[e, p] for p in range(parts)])
                                   for e in range(self.num_experts)])
        except RuntimeError as exc:  # experts of different shapes
            raise WeightLoadError(f"{match['prefix']}: the experts' {match['proj']} tensors "
                                  f"do not stack: {exc}") from None
        return [(f"{match['prefix']}.{ours}", stacked)]
