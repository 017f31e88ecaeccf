"""Host-to-device copies that never wait for the GPU (docs/design.md §5: no host
synchronisation inside a step but the read of the sampled tokens).

torch's blocking copy of a host tensor to a CUDA device synchronises the stream: the host waits
until every kernel queued before it has run. A step that copied its sampling parameters after
queueing the forward pass would wait for the whole pass before it could queue the sampler, and
the GPU would idle while the host catches up. A copy from pinned memory with non_blocking=True
is queued like a kernel instead; torch's pinned-memory allocator keeps the host buffer until
the copy has run. On the CPU a copy is no copy at all.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`, queued without waiting for the device."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def tensor_on(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, queued without waiting for the device."""
    return to_device(torch.tensor(values, dtype=dtype), device)
