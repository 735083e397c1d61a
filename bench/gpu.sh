#!/usr/bin/env bash
# The benchmark suite on a lent GPU, in one prepared run (< 5 minutes): DeBERTa-v3-base shapes with random
# weights (no hub there), bf16, 30 prompts x 192 tokens. Needs torch (CUDA), transformers, peft on the machine;
# onnxruntime-gpu and flashdeberta are measured when installed. Prints a table and, last, one JSON line.
#   bash bench/gpu.sh                 # the full suite
#   bash bench/gpu.sh --reps 5        # fewer rounds
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 290 python -m bench.gpu "$@"
