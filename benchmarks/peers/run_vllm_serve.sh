#!/usr/bin/env bash
# Peer B, online: `vllm serve` on 127.0.0.1, then RUNS rounds of
#   (1) vLLM's own client, `vllm bench serve` (custom dataset = the reference workload, rate inf)
#   (2) bench_openai_client.py (the client every HTTP server here is measured with);
# the server is stopped by its PID at the end. Prefix caching is off, so that a round cannot
# reuse the KV cache an earlier round left for the same prompts.
# Env: RUNS (2), PORT (8001), BIND (0-1: both cores, vLLM's best here; auto is its default),
# DTYPE (bfloat16), MAX_NUM_SEQS (128), CONCURRENCY (32), VLLM_CPU_KVCACHE_SPACE (4 GiB).
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
PORT="${PORT:-8001}"
BIND="${BIND:-0-1}"
NAME=smollm2-135m
VERSION="$("$VLLM_VENV/bin/python" -c 'from importlib.metadata import version; print("vllm-cpu", version("vllm-cpu"))')"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"

# vLLM's custom dataset wants {"prompt", "output_tokens"} per line.
CUSTOM="$LOG_DIR/workload_vllm_custom.jsonl"
"$VLLM_VENV/bin/python" - "$WORKLOAD" "$CUSTOM" <<'PY'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        r = json.loads(line)
        g.write(json.dumps({"prompt": r["prompt"], "output_tokens": r["max_tokens"]}) + "\n")
PY

VLLM_CPU_OMP_THREADS_BIND="$BIND" "$VLLM_VENV/bin/python" "$BENCH_DIR/vllm_cli.py" serve "$MODEL_DIR" \
  --host 127.0.0.1 --port "$PORT" --served-model-name "$NAME" --dtype "${DTYPE:-bfloat16}" \
  --max-num-seqs "${MAX_NUM_SEQS:-128}" --max-model-len 1024 --seed 0 --no-enable-prefix-caching \
  > "$LOG_DIR/vllm-serve-$BIND.log" 2>&1 &
PID=$!
echo "vllm serve pid $PID"
trap 'stop_pid $PID' EXIT
wait_http "http://127.0.0.1:$PORT/health" 1200

for run in $(seq "$RUNS"); do
  TAG="$(date -u +%Y%m%dT%H%M%SZ)"
  OUT="$RESULTS_DIR/vllm_bench_serve_${BIND}_$TAG.json"
  echo "== vllm bench serve run $run (bind=$BIND, $TAG)"
  "$VLLM_VENV/bin/python" "$BENCH_DIR/vllm_cli.py" bench serve --backend vllm \
    --base-url "http://127.0.0.1:$PORT" --model "$NAME" --tokenizer "$MODEL_DIR" \
    --dataset-name custom --dataset-path "$CUSTOM" --custom-output-len -1 \
    --skip-chat-template --disable-shuffle --num-prompts 128 --ignore-eos \
    --temperature 0 --request-rate inf --seed 0 --percentile-metrics ttft,tpot,itl,e2el \
    --save-result --result-dir "$RESULTS_DIR" --result-filename "$(basename "$OUT")" \
    > "$LOG_DIR/vllm-bench-serve-$BIND-$TAG.log" 2>&1
  # The saved JSON records the tokenizer's absolute path: keep the record free of machine paths.
  "$VLLM_VENV/bin/python" - "$OUT" <<'PY'
import json, sys
p = sys.argv[1]
with open(p) as f:
    r = json.load(f)
r["tokenizer_id"] = "$MODEL_DIR"
with open(p, "w") as f:
    json.dump(r, f)
PY
  sed -n '/Serving Benchmark Result/,$p' "$LOG_DIR/vllm-bench-serve-$BIND-$TAG.log" \
    | grep -vE 'nanobind|leaked|skipped remainder|refleaks' || true
  echo
  echo "== bench_openai_client.py against vllm serve, run $run (bind=$BIND)"
  "$PEERS_VENV/bin/python" "$BENCH_DIR/bench_openai_client.py" --base-url "http://127.0.0.1:$PORT" \
    --workload "$WORKLOAD" --model "$NAME" --concurrency "${CONCURRENCY:-32}" --prompt tokens \
    --eos ignore_eos --label "vllm-serve bind=$BIND" --engine-version "$VERSION" \
    --out "$RESULTS_DIR/openai_client.jsonl" \
    | grep -E '"(wall_s|output_tok_per_s|completed|length_mismatches|mean_ttft_ms|mean_tpot_ms)"'
done
