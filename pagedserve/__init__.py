"""pagedserve: an LLM serving engine in the vLLM family, as gRPC microservices.

Everything installs under this one namespace (docs/architecture.md, "One namespace"):

- `pagedserve.v1` (proto/pagedserve/v1): the versioned contract, .proto files and their
  generated stubs, nothing else;
- `pagedserve.runtime` (pagedserve/runtime): what every process shares (flags, logging, gRPC
  serving, chat prompts); imports only the contract;
- `pagedserve.gateway` (gateway/pagedserve/gateway): the stateless front door;
- `pagedserve.scheduler` (scheduler_svc/pagedserve/scheduler): block tables and every batching
  decision;
- `pagedserve.executor` (executor_svc/pagedserve/executor): weights, paged KV memory, the model
  runner;
- `pagedserve.kernels` (kernels/pagedserve/kernels): attention and layer kernels (Triton, C,
  PyTorch);
- `pagedserve.entrypoints` (pagedserve/entrypoints): the command line, `up`, the offline `LLM`,
  beam search: the only code that starts or wires services;
- `pagedserve.bench` (pagedserve/bench): `pagedserve bench`;
- `pagedserve.testing` (pagedserve/testing): tiny models and process helpers shared by the
  tests and the benchmarks.

The offline API is importable from here (`from pagedserve import LLM, EngineConfig,
SamplingParams`); it is loaded on first use, so the services, which import `pagedserve.*`
modules, never pay for it.
"""

import importlib
import pkgutil

# Run from a source tree without installing it (a lent GPU machine installs nothing), each
# part's folder on PYTHONPATH adds its pagedserve/<name> to this package, as in a
# pkgutil-style namespace: PYTHONPATH=.:proto:gateway:scheduler_svc:executor_svc:kernels.
# Installed, the wheel's one folder or the editable finder provides them and this adds nothing.
__path__ = pkgutil.extend_path(__path__, __name__)

_LAZY_EXPORTS = {
    "LLM": "pagedserve.entrypoints.offline",
    "BeamSearchParams": "pagedserve.runtime.beam_search",
    "EngineConfig": "pagedserve.entrypoints.offline",
    "SamplingParams": "pagedserve.v1.common_pb2",
}
__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
