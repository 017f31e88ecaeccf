#!/usr/bin/env bash
# llama.cpp's own `llama-server` (parallel slots, continuous batching: peer C2), built from the
# llama.cpp sources vendored in the llama-cpp-python sdist on PyPI, so that C1 and C2 run the same
# llama.cpp commit. Needs cmake, ninja and a C/C++ compiler.
# Env: LLAMA_BUILD_DIR (env.sh), LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default nproc).
# Result: $LLAMA_BUILD_DIR/build/bin/llama-server
set -euo pipefail
. "$(dirname "$0")/env.sh"
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$LLAMA_BUILD_DIR"
cd "$LLAMA_BUILD_DIR"
python3 -m pip download --no-deps --no-binary :all: -d . "llama-cpp-python==$VER"
tar -xzf "llama_cpp_python-$VER.tar.gz"
SRC="$LLAMA_BUILD_DIR/llama_cpp_python-$VER/vendor/llama.cpp"
cmake -S "$SRC" -B "$LLAMA_BUILD_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
cmake --build "$LLAMA_BUILD_DIR/build" --target llama-server -j "$JOBS"
"$LLAMA_BUILD_DIR/build/bin/llama-server" --version
