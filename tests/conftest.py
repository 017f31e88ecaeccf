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
import subprocess
import sys
import time

import grpc
import pytest

from pagedserve.serving import free_ports
from pagedserve.v1 import executor_pb2, executor_pb2_grpc
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


def start_executor(model_dir: pathlib.Path, log_path: pathlib.Path, *flags: str,
                   timeout: float = 120):
    """`pagedserve executor` on a free port, once it answers Describe:
    (process, address, description)."""
    (port,) = free_ports(1)
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve", "executor", "--port", str(port), "--model",
         str(model_dir), "--log-format", "json", *flags], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = executor_pb2_grpc.ExecutorStub(channel)
        while True:
            try:
                return process, address, stub.Describe(executor_pb2.DescribeRequest(),
                                                       timeout=2)
            except grpc.RpcError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "executor did not start"
                time.sleep(0.2)
