#!/usr/bin/env bash
# The GPU check, for a session that has a device: run on the GPU machine from the repository root, with $OUT set.
# Measures the proxy preset in bf16 against transformers and records every number under $OUT.
#   bash benchmarks/gpu.sh
set -euo pipefail
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python benchmarks/model_step.py --size proxy --dtype bfloat16 --batch 2 --seq 4096 --steps 3 --rounds 2 \
  --json "$OUT/model_step.json" | tee "$OUT/model_step.txt"
python benchmarks/model_step.py --size proxy --dtype bfloat16 --batch 2 --seq 4096 --steps 3 --rounds 2 --compile \
  --json "$OUT/model_step-compile.json" | tee "$OUT/model_step-compile.txt"
python benchmarks/train_step.py --size proxy --batch 2 --seq 4096 --steps 3 --rounds 2 \
  --json "$OUT/train_step.json" | tee "$OUT/train_step.txt"
python benchmarks/recompute.py --batch 4 --seq 4096 | tee "$OUT/recompute.txt"
python -m pytest -q tests/test_hf_parity.py tests/test_model.py tests/test_experts.py | tail -3 | tee "$OUT/tests.txt"
