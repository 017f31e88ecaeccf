#!/usr/bin/env bash
# Peer C1: llama-cpp-python's OpenAI server on 127.0.0.1, serving the original Q4_1 GGUF, driven
# by bench_openai_client.py. What this server is, and why each setting:
# - one llama context behind a lock: requests run one at a time (no parallel slots, no continuous
#   batching), so a concurrent client's requests queue inside the server;
# - interrupt_requests must be off, or a waiting request cuts the stream in progress short;
# - no ignore_eos: min_tokens = max_tokens (EOS masked until then) forces the length;
# - text prompts only (the workload's text re-encodes to the same ids; the GGUF adds no BOS);
# - its sampler applies repeat_penalty 1.1 by default even when greedy: we send 1.0, so that
#   every engine does plain greedy decoding.
# A fresh server per run, so that no run finds another's cached prompt.
# Env: RUNS (2), PORT (8002), CONCURRENCY (32).
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
PORT="${PORT:-8002}"
GGUF="$(gguf_path)"
VERSION="$("$LLAMACPP_VENV/bin/python" -c 'from importlib.metadata import version; print("llama-cpp-python", version("llama-cpp-python"))')"
for run in $(seq "$RUNS"); do
  "$LLAMACPP_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias smollm2-135m \
    --host 127.0.0.1 --port "$PORT" --n_ctx 1024 --n_batch 512 \
    --n_threads "$(nproc)" --n_threads_batch "$(nproc)" --interrupt_requests False \
    > "$LOG_DIR/llama-cpp-python-server-$run.log" 2>&1 &
  PID=$!
  trap 'stop_pid $PID' EXIT
  echo "== llama-cpp-python server run $run (pid $PID)"
  wait_http "http://127.0.0.1:$PORT/v1/models" 300
  "$PEERS_VENV/bin/python" "$BENCH_DIR/bench_openai_client.py" --base-url "http://127.0.0.1:$PORT" \
    --workload "$WORKLOAD" --model smollm2-135m --concurrency "${CONCURRENCY:-32}" --prompt text \
    --eos min_tokens --extra-body '{"repeat_penalty": 1.0}' \
    --label "llama-cpp-python-server" --engine-version "$VERSION" \
    --out "$RESULTS_DIR/openai_client.jsonl" \
    | grep -E '"(wall_s|output_tok_per_s|completed|length_mismatches|mean_ttft_ms|mean_tpot_ms)"' || true
  stop_pid "$PID"
  trap - EXIT
done
