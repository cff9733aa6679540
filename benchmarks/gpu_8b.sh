#!/usr/bin/env bash
# The 8B-shaped checks for a GPU machine (H100/H200), in under 8 minutes, nothing downloaded:
# bench_pathways at LLaMA-3.1-8B / LlamaScope-32K shapes (bf16, random weights), then the study's
# model work at those shapes (1,550 targets, 32 distinct SAEs). JSON to $OUT (or ./bench-out).
#   bash benchmarks/gpu_8b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv" || true
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 200 python benchmarks/bench_pathways.py --preset llama31-8b --rounds 2 | tee "$out/bench_pathways.json"
timeout 260 python benchmarks/bench_study_gpu.py --preset llama31-8b --budget-s 150 | tee "$out/bench_study_gpu.json"
