"""One interface over the implementations of the executor's kernels (docs/design.md §5): a
`Kernels` set holds every operation the models call, with the same signatures in every set.

`select_kernels` picks the set once, when the model is built: Triton on CUDA; on the CPU the
"cpu" set (C kernels built at first use, cpu_kernels.py: the KV write, attention, norms, rotary,
SiLU-and-mul, quantized linears, and float linears through weights packed for our own matmuls
or oneDNN's) when a C compiler could build them, else the PyTorch path; `--attention-backend`
forces one. The choice is per model (bound onto its layers by
`pagedserve.executor.models.layers.bind_kernels`), not process-wide, so two models in one
process (the tests, the offline API) may use different sets.
The Triton modules are imported only when the Triton set is chosen: importing triton is slow,
and the PyTorch path must not need it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.kernels import activation, attention, moe, norm, quantization, rotary

BACKENDS = ("auto", "torch", "cpu", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rotary: Callable[..., torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # A linear layer's weight repacked for this set's matmul (None: that weight stays as it
    # is), and the matmul on a packed weight: packed_linear(x, packed, bias). A packed form
    # with a `rows(ids, dtype)` method serves a tied embedding's lookups too.
    pack_linear: Callable[[torch.Tensor], object | None] | None = None
    packed_linear: Callable[..., torch.Tensor] | None = None
    # A quantized weight (quantization.Int8Weight or GroupedWeight) repacked for this set's
    # matmul (None: it stays as it is), and that matmul: quantized_linear(x, weight, bias).
    pack_quantized: Callable[[quantization.QuantizedWeight], object] | None = None
    quantized_linear: Callable[..., torch.Tensor] = quantization.quantized_linear
    # Mixture-of-experts feed-forward: fused_moe(x, w13, w2, weights, ids, act_and_mul).
    fused_moe: Callable[..., torch.Tensor] = moe.fused_moe


TORCH_KERNELS = Kernels(
    name="torch", write_kv_cache=attention.write_kv_cache,
    paged_attention=attention.paged_attention, rms_norm=norm.rms_norm,
    add_rms_norm=norm.add_rms_norm, apply_rotary=rotary.apply_rotary,
    silu_and_mul=activation.silu_and_mul)


def triton_kernels() -> Kernels:
    from pagedserve.kernels import (
        triton_activation,
        triton_attention,
        triton_moe,
        triton_norm,
        triton_quantization,
        triton_rotary,
    )

    return Kernels(
        name="triton", write_kv_cache=triton_attention.write_kv_cache_triton,
        paged_attention=triton_attention.paged_attention_triton,
        rms_norm=triton_norm.rms_norm_triton, add_rms_norm=triton_norm.add_rms_norm_triton,
        apply_rotary=triton_rotary.apply_rotary_triton,
        silu_and_mul=triton_activation.silu_and_mul_triton,
        pack_quantized=triton_quantization.pack_quantized_triton,
        quantized_linear=triton_quantization.quantized_linear_triton,
        fused_moe=triton_moe.fused_moe_triton)


def cpu_kernels() -> Kernels:
    from pagedserve.kernels import cpu_kernels as cpu

    return dataclasses.replace(
        TORCH_KERNELS, name="cpu", write_kv_cache=cpu.write_kv_cache_cpu,
        paged_attention=cpu.paged_attention_cpu,
        rms_norm=cpu.rms_norm_cpu, add_rms_norm=cpu.add_rms_norm_cpu,
        apply_rotary=cpu.apply_rotary_cpu, silu_and_mul=cpu.silu_and_mul_cpu,
        pack_linear=cpu.pack_linear_cpu, packed_linear=cpu.packed_linear_cpu,
        pack_quantized=cpu.pack_quantized_cpu, quantized_linear=cpu.quantized_linear_cpu)


class KernelBackendError(ValueError):
    """The requested kernel backend cannot run on this device."""


def select_kernels(backend: str, device: torch.device) -> Kernels:
    """`backend` is one of BACKENDS; auto means Triton on CUDA, and on the CPU the cpu set
    when its C kernel builds, else PyTorch."""
    from pagedserve.kernels import cpu_kernels as cpu

    if backend not in BACKENDS:
        raise KernelBackendError(f"attention backend {backend!r} is not one of "
                                 f"{', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        else:
            backend = "cpu" if cpu.available() else "torch"
    if backend == "torch":
        return TORCH_KERNELS
    if backend == "cpu":
        if device.type != "cpu":
            raise KernelBackendError(f"attention backend cpu runs on the cpu, not {device.type}")
        if not cpu.available():
            raise KernelBackendError("attention backend cpu: its C kernels could not be built "
                                     "(no C compiler? see the warning above); use torch")
        return cpu_kernels()
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelBackendError(
            f"attention backend triton on {device.type} runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment (slow: for checks only), or use torch")
    return triton_kernels()
