#!/usr/bin/env bash
# A quick check of an image: Transformer Engine imports (where a GPU is), a few demo steps on the first GPU (or the
# CPU) in a fresh run directory, a 2-GPU torchrun step where 2 GPUs exist, then the CPU test suite's core.
set -euo pipefail
run_dir=$(mktemp -d /tmp/moetrain-smoke.XXXXXX)
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -gt 0 ]; then
  python -c 'import transformer_engine.pytorch as te; print("transformer_engine", te.__name__, "imports")'
fi
moetrain train train.steps=20 logging.interval=5 run.dir="$run_dir/one"
if [ "$gpus" -ge 2 ]; then
  torchrun --standalone --nproc-per-node 2 -m moetrain train train.steps=4 logging.interval=1 \
    train.micro_batch_size=8 run.dir="$run_dir/two"
fi
python -m pytest -q tests/test_hf_parity.py tests/test_model.py
