"""Shared fixtures: tiny random-weight models saved as Hugging Face directories, free ports."""

import os

# Triton chooses its interpreter when it is first imported, and torch / transformers import it:
# this must run before them. The Triton kernels' tests run on the CPU through the interpreter;
# on a GPU machine, TRITON_INTERPRET=0 tests them compiled.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests compare against float32 references (transformers, float64 loops): every service a
# test starts computes in float32 unless the test asks for another dtype (on CPUs with AVX-512
# BF16 `--dtype auto` would pick bfloat16).
os.environ.setdefault("PAGEDSERVE_DTYPE", "float32")

import pathlib

import pytest

from pagedserve.testing.processes import shared_internal_secret

# Every service a test starts inherits one internal secret (internal calls need a credential).
shared_internal_secret()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A 2-layer LLaMA (GQA) with random weights, config and a byte-level BPE tokenizer."""
    # Imported here, not at the top: torch and transformers take seconds to import, and test
    # files that need neither (the scheduler's, the gateway's) should not pay for them; the
    # mutation runs (`make mutation`) start pytest once per mutant.
    from pagedserve.testing.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """The embedded default model, converted once per test session into a fresh cache (its
    GGUF's quantized weights kept, as the engine serves it)."""
    from pagedserve.executor.model_files import resolve_model

    return resolve_model(None, tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def default_model_float(tmp_path_factory):
    """The embedded default model dequantized to float32 (`--gguf-dequantize`), as transformers
    reads it."""
    from pagedserve.executor.model_files import resolve_model

    return resolve_model(None, tmp_path_factory.mktemp("model-cache"), gguf_dequantize=True)


#END
