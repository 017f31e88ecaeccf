#!/usr/bin/env bash
# pagedserve beside the HTTP peers: a fresh `pagedserve up` per run (prefix caching off,
# max_model_len 1024, as the vLLM server rows), driven by bench_openai_client.py exactly as
# run_vllm_serve.sh drives `vllm serve` (32 in flight, token-id prompts, ignore_eos). The stack
# is stopped by its PID after each run. Alternate with run_vllm_serve.sh (RUNS=1) to compare
# within one session.
# Env: RUNS (2), PORT (8000; the gRPC ports are pagedserve's defaults), CONCURRENCY (32),
# PAGEDSERVE (the repository's .venv/bin/pagedserve); any other PAGEDSERVE_* flag variable
# (e.g. PAGEDSERVE_DTYPE) reaches `pagedserve up` as usual.
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
PORT="${PORT:-8000}"
NAME=SmolLM2-135M-Instruct
COMMIT="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
for run in $(seq "$RUNS"); do
  PAGEDSERVE_NO_PREFIX_CACHING=1 "$PAGEDSERVE" up --http-port "$PORT" --max-model-len 1024 \
    > "$LOG_DIR/pagedserve-up-$run.log" 2>&1 &
  PID=$!
  trap 'stop_pid $PID' EXIT
  echo "== pagedserve up run $run ($COMMIT, pid $PID)"
  wait_http "http://127.0.0.1:$PORT/ready" 600
  "$PEERS_VENV/bin/python" "$BENCH_DIR/bench_openai_client.py" --base-url "http://127.0.0.1:$PORT" \
    --workload "$WORKLOAD" --model "$NAME" --concurrency "${CONCURRENCY:-32}" --prompt tokens \
    --eos ignore_eos --label "pagedserve up" --engine-version "pagedserve $COMMIT" \
    --out "$RESULTS_DIR/openai_client.jsonl" \
    | grep -E '"(wall_s|output_tok_per_s|completed|length_mismatches|mean_ttft_ms|mean_tpot_ms)"' || true
  stop_pid "$PID"
  trap - EXIT
done
