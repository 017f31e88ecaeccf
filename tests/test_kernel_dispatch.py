"""Which kernel set the executor runs (kernels/pagedserve/kernels/dispatch.py,
`--attention-backend`)."""

import pytest
import torch

from pagedserve.entrypoints.offline import LLM
from pagedserve.executor.models.layers import KernelLayer
from pagedserve.kernels.dispatch import KernelBackendError, select_kernels
from pagedserve.v1.common_pb2 import SamplingParams

CPU = torch.device("cpu")


def test_each_backend_on_cpu():
    assert select_kernels("torch", CPU).name == "torch"
    assert select_kernels("cpu", CPU).name == "cpu"
    assert select_kernels("triton", CPU).name == "triton"  # conftest set TRITON_INTERPRET=1


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        select_kernels("triton", CPU)


def test_unknown_backend_is_named():
    with pytest.raises(KernelBackendError,
                       match="'cutlass' is not one of auto, torch, cpu, triton"):
        select_kernels("cutlass", CPU)


def _kernel_sets(llm: LLM) -> set[str]:
    runner = llm.make_handle().runner
    return {m.kernels.name for m in runner.model.modules() if isinstance(m, KernelLayer)}


@pytest.mark.slow
def test_the_flag_reaches_every_layer_and_changes_no_token(tiny_llama_dir):
    """The offline engine (the executor's own bootstrap) with each backend: every kernel layer
    runs the chosen set, and greedy decoding gives the same tokens."""
    prompts = [[5, 6, 7], list(range(10, 31))]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "cpu", "triton"):
        llm = LLM(str(tiny_llama_dir), attention_backend=backend, kv_cache_gib=0.01,
                  block_size=16, dtype="float32")
        assert _kernel_sets(llm) == {backend}
        outputs[backend] = [o.outputs[0].token_ids for o in
                            llm.generate(prompts, params)]
    assert outputs["triton"] == outputs["torch"] == outputs["cpu"]
    assert all(len(tokens) == 6 for tokens in outputs["torch"])
