#!/usr/bin/env bash
# Every peer measurement of RESULTS.md, one after another (never two at once: they share the
# cores). About 95 minutes on the 2-core machine of RESULTS.md. A failed step is reported and the
# rest go on. pagedserve's own runs (run_pagedserve_*.sh) are not part of it.
set -uo pipefail
HERE="$(dirname "$0")"
run() {
  echo "######## $* $(date -u +%FT%TZ)"
  env "$@" || echo "!!!!!!!! $* exited $?"
}
run bash "$HERE/run_vllm_offline.sh"
run BIND=auto bash "$HERE/run_vllm_serve.sh"   # vLLM's default binding
run BIND=0-1 bash "$HERE/run_vllm_serve.sh"    # both cores
run bash "$HERE/run_llama_server.sh"
run bash "$HERE/run_llama_cpp_python.sh"
run bash "$HERE/run_hf.sh"
echo "######## done $(date -u +%FT%TZ)"
