"""One interface over the two implementations of the executor's kernels (DESIGN.md §5): a
`Kernels` set holds every operation the models call, with the same signatures in both sets.

`select_kernels` picks the set once, when the model is built: Triton on CUDA, PyTorch on CPU,
unless `--attention-backend` forces one. The choice is per model (bound onto its layers by
`executor_svc.models.layers.bind_kernels`), not process-wide, so two models in one process (the
tests, the offline API) may use different sets. The Triton modules are imported only when the
Triton set is chosen: importing triton is slow, and the PyTorch path must not need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import activation, attention, norm, rotary

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rotary: Callable[..., torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_KERNELS = Kernels(
    name="torch", write_kv_cache=attention.write_kv_cache,
    paged_attention=attention.paged_attention, rms_norm=norm.rms_norm,
    add_rms_norm=norm.add_rms_norm, apply_rotary=rotary.apply_rotary,
    silu_and_mul=activation.silu_and_mul)


def triton_kernels() -> Kernels:
    from kernels import triton_activation, triton_attention, triton_norm, triton_rotary

    return Kernels(
        name="triton", write_kv_cache=triton_attention.write_kv_cache_triton,
        paged_attention=triton_attention.paged_attention_triton,
        rms_norm=triton_norm.rms_norm_triton, add_rms_norm=triton_norm.add_rms_norm_triton,
        apply_rotary=triton_rotary.apply_rotary_triton,
        silu_and_mul=triton_activation.silu_and_mul_triton)


class KernelBackendError(ValueError):
    """The requested kernel backend cannot run on this device."""


def select_kernels(backend: str, device: torch.device) -> Kernels:
    """`backend` is one of BACKENDS; auto means Triton on CUDA and PyTorch elsewhere."""
    if backend not in BACKENDS:
        raise KernelBackendError(f"attention backend {backend!r} is not one of "
                                 f"{', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return TORCH_KERNELS
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelBackendError(
            f"attention backend triton on {device.type} runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment (slow: for checks only), or use torch")
    return triton_kernels()
