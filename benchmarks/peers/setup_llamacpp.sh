#!/usr/bin/env bash
# The llama-cpp-python venv (peer C1): llama-cpp-python[server] built from its sdist, which
# compiles the llama.cpp it vendors with cmake (GGML_NATIVE is on by default).
set -euo pipefail
. "$(dirname "$0")/env.sh"
PY="${PYTHON:-python3.11}"
"$PY" -m venv "$LLAMACPP_VENV"
"$LLAMACPP_VENV/bin/pip" install --upgrade pip
time CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$LLAMACPP_VENV/bin/pip" install "llama-cpp-python[server]==0.3.36"
