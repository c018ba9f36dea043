#!/usr/bin/env bash
# The GPU check, for a session that has a device: run on the GPU machine from the repository root, with $OUT set.
# Transformer Engine must be installed first (../shared/gpu/README.md: five loads, ~3 minutes); without it the TE
# rows and tests report the reason and the rest still runs. Budget: under 8 minutes on an H200.
#   bash benchmarks/gpu.sh
# Records, with date and hardware: the proxy's bf16 model step and training step against transformers'
# DeepseekV3ForCausalLM (same config and batch, grouped_mm experts); bf16 vs TE blockwise, TE current-scaling and
# native FP8 (step time and 50-step losses); the GPU tests (TE, precision, model, experts).
set -euo pipefail
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch; print('torch', torch.__version__, torch.version.cuda)";
  python -c "import transformer_engine as te; print('transformer_engine', te.__version__)" 2>&1 | tail -1; } \
  > "$OUT/machine.txt"
python benchmarks/model_step.py --size proxy --dtype bfloat16 --batch 2 --seq 4096 --steps 3 --rounds 2 \
  --json "$OUT/model_step.json" | tee "$OUT/model_step.txt"
python benchmarks/train_step.py --size proxy --batch 2 --seq 4096 --steps 3 --rounds 2 \
  --json "$OUT/train_step.json" | tee "$OUT/train_step.txt"
python benchmarks/fp8_step.py --size proxy --batch 2 --seq 4096 --steps 50 \
  --json "$OUT/fp8_step.json" | tee "$OUT/fp8_step.txt"
python -m pytest -q -rs tests/test_precision.py tests/test_hf_parity.py tests/test_model.py tests/test_experts.py \
  | tail -8 | tee "$OUT/tests.txt"
