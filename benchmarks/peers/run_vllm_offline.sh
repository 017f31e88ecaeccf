#!/usr/bin/env bash
# Peer B, offline: one LLM.generate over the whole workload (bench_vllm_offline.py). RUNS rounds
# over the CPU bindings in BINDS:
#   auto  vLLM's default: OpenMP threads on every core but one, which it keeps for its scheduler
#         and front-end processes (on a 2-core machine: one compute thread);
#   0-1   OpenMP threads on cores 0 and 1, the scheduler sharing them.
# Env: RUNS (2), BINDS ("auto 0-1"), DTYPE (bfloat16), MAX_NUM_SEQS (128),
# VLLM_CPU_KVCACHE_SPACE (4 GiB).
set -euo pipefail
. "$(dirname "$0")/env.sh"
RUNS="${RUNS:-2}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
for run in $(seq "$RUNS"); do
  for bind in ${BINDS:-auto 0-1}; do
    echo "== vllm offline run $run bind=$bind"
    VLLM_CPU_OMP_THREADS_BIND="$bind" "$VLLM_VENV/bin/python" "$BENCH_DIR/bench_vllm_offline.py" \
      --workload "$WORKLOAD" --dtype "${DTYPE:-bfloat16}" --max-num-seqs "${MAX_NUM_SEQS:-128}" \
      --out "$RESULTS_DIR/vllm_offline.jsonl" > "$LOG_DIR/vllm-offline-$run-$bind.log" 2>&1
    grep '^RESULT' "$LOG_DIR/vllm-offline-$run-$bind.log" | cut -c1-400
  done
done
