#!/usr/bin/env bash
# The 8B-shaped checks for a GPU machine (H100/H200), in under 9 minutes, nothing downloaded:
# bench_pathways at LLaMA-3.1-8B / LlamaScope-32K shapes (bf16, random weights), then the study's
# model work at those shapes (1,550 targets, 32 distinct SAEs): phases A-C, the tokens step's read and the
# graphs step's cost per target (whole-prompt graphs of 4 targets on both prompts) and the contrast step on those
# graphs. JSON to $OUT (or ./bench-out).
#   bash benchmarks/gpu_8b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv" || true
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 200 python benchmarks/bench_pathways.py --preset llama31-8b --rounds 2 | tee "$out/bench_pathways.json"
timeout 300 python benchmarks/bench_study_gpu.py --preset llama31-8b --budget-s 150 --graph-targets 4 | tee "$out/bench_study_gpu.json"
