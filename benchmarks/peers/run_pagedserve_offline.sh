#!/usr/bin/env bash
# pagedserve beside peer B1: `pagedserve bench throughput` over the reference workload (the offline
# engine, every request submitted at once, start-up not timed), with the settings of the vLLM
# offline rows: max_model_len 1024, prefix caching off, EOS ignored. RUNS runs, each in a fresh
# process; alternate with run_vllm_offline.sh (RUNS=1) to compare within one session.
# Env: RUNS (2), DTYPE (auto: bfloat16 where the CPU has AVX-512 BF16 or AMX), MAX_NUM_SEQS (256),
# PAGEDSERVE (the repository's .venv/bin/pagedserve).
# Each run writes $RESULTS_DIR/pagedserve_throughput_<commit>_<UTC time>.json.
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
COMMIT="$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
for run in $(seq "$RUNS"); do
  TAG="$(date -u +%Y%m%dT%H%M%SZ)"
  OUT="$RESULTS_DIR/pagedserve_throughput_${COMMIT}_$TAG.json"
  echo "== pagedserve bench throughput run $run ($COMMIT, $TAG)"
  "$PAGEDSERVE" bench throughput --dataset jsonl --dataset-path "$WORKLOAD" --ignore-eos \
    --max-model-len 1024 --no-prefix-caching --dtype "${DTYPE:-auto}" \
    --max-num-seqs "${MAX_NUM_SEQS:-256}" --result-json "$OUT" \
    > "$LOG_DIR/pagedserve-throughput-$TAG.log" 2>&1
  grep -E 'throughput|Successful|mismatch' "$LOG_DIR/pagedserve-throughput-$TAG.log" || true
done
