#!/usr/bin/env bash
# Peer C2: llama.cpp's own llama-server (build_llama_server.sh) on 127.0.0.1 with NP parallel
# slots and continuous batching, serving the original Q4_1 GGUF, driven by bench_openai_client.py
# with token-id prompts and ignore_eos. The context (-c) is split evenly over the slots, 1024
# tokens each. A fresh server per run, and --cache-ram 0, so that no run reuses another's cached
# prompts.
# Env: RUNS (2), PORT (8003), NP (32), CONCURRENCY (NP), LLAMA_CPP_PYTHON_VERSION (0.3.36: the
# sdist the server was built from, recorded with the results).
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
PORT="${PORT:-8003}"
NP="${NP:-32}"
GGUF="$(gguf_path)"
VERSION="llama.cpp vendored in llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
for run in $(seq "$RUNS"); do
  "$LLAMA_BUILD_DIR/build/bin/llama-server" -m "$GGUF" --alias smollm2-135m \
    --host 127.0.0.1 --port "$PORT" -np "$NP" -c $((NP * 1024)) -cb --cache-ram 0 \
    -t "$(nproc)" -tb "$(nproc)" -b 2048 -ub 512 --no-webui \
    > "$LOG_DIR/llama-server-np$NP-$run.log" 2>&1 &
  PID=$!
  trap 'stop_pid $PID' EXIT
  echo "== llama-server run $run (np=$NP, pid $PID)"
  wait_http "http://127.0.0.1:$PORT/health" 300
  "$PEERS_VENV/bin/python" "$BENCH_DIR/bench_openai_client.py" --base-url "http://127.0.0.1:$PORT" \
    --workload "$WORKLOAD" --model smollm2-135m --concurrency "${CONCURRENCY:-$NP}" \
    --prompt tokens --eos ignore_eos --label "llama-server np=$NP" --engine-version "$VERSION" \
    --out "$RESULTS_DIR/openai_client.jsonl" \
    | grep -E '"(wall_s|output_tok_per_s|completed|length_mismatches|mean_ttft_ms|mean_tpot_ms)"' || true
  stop_pid "$PID"
  trap - EXIT
done
