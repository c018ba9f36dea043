#!/usr/bin/env bash
# The GPU check, for a session that has a device: run on the GPU machine from the repository root, with $OUT set.
# Transformer Engine must be installed first (../shared/gpu/README.md: five loads, ~3 minutes); without it the TE
# rows and tests report the reason and the rest still runs. Budget: under 8 minutes on an H200.
#   bash benchmarks/gpu.sh
# Records, with date and hardware: the GPU tests (TE, precision, model, experts); the proxy's bf16 model step and
# training step against transformers' DeepseekV3ForCausalLM (same config and batch, grouped_mm experts); bf16 vs TE
# blockwise, TE current-scaling and native FP8 (step time and 50-step losses); the attention core per backend
# (SDPA, compiled FlexAttention). A failing part is recorded and the next one still runs; the exit status says
# whether all passed.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
status=0
run() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$OUT/$name.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }
{ date -u +%Y-%m-%dT%H:%MZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch; print('torch', torch.__version__, torch.version.cuda)";
  python -c "import transformer_engine as te; print('transformer_engine', te.__version__)" 2>&1 | tail -1; } \
  > "$OUT/machine.txt"
run tests python -m pytest -q -rs tests/test_precision.py tests/test_hf_parity.py tests/test_model.py \
  tests/test_experts.py tests/test_attention.py
run model_step python benchmarks/model_step.py --size proxy --dtype bfloat16 --batch 2 --seq 4096 --steps 3 \
  --rounds 2 --json "$OUT/model_step.json"
run train_step python benchmarks/train_step.py --size proxy --batch 2 --seq 4096 --steps 3 --rounds 2 \
  --json "$OUT/train_step.json"
run attention python benchmarks/attention.py --seq 4096 --batch 2 --heads 16 --json "$OUT/attention.json"
run fp8_step python benchmarks/fp8_step.py --size proxy --batch 2 --seq 4096 --steps 50 --json "$OUT/fp8_step.json"
exit $status
