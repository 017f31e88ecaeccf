"""Shared fixtures: tiny random-weight models saved as Hugging Face directories, free ports."""

import pathlib
import socket

import pytest

from tests.tiny_models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """A 2-layer LLaMA (GQA) with random weights, config and a byte-level BPE tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """The embedded default model, converted once per test session into a fresh cache."""
    from executor_svc.model_files import resolve_model

    return resolve_model(None, tmp_path_factory.mktemp("model-cache"))


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
