#!/usr/bin/env bash
# Baseline A: transformers `generate` with static batching (bench_hf.py). RUNS rounds; a round
# runs every (dtype, batch size) once, so that drift over time shows up between rounds.
# Env: RUNS (2), DTYPES ("float32 bfloat16"), BATCH_SIZES ("16 32").
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
for run in $(seq "$RUNS"); do
  for dtype in ${DTYPES:-float32 bfloat16}; do
    for bs in ${BATCH_SIZES:-16 32}; do
      echo "== transformers run $run dtype=$dtype bs=$bs"
      "$PEERS_VENV/bin/python" "$BENCH_DIR/bench_hf.py" --workload "$WORKLOAD" \
        --dtype "$dtype" --batch-size "$bs" --out "$RESULTS_DIR/hf.jsonl" 2>&1 \
        | tee -a "$LOG_DIR/hf.log" | grep -E '"(dtype|batch_size|wall_s|output_tok_per_s)"'
    done
  done
done
