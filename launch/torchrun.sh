#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes on CPU with gloo):
#   bash launch/torchrun.sh model=proxy data=synthetic train.steps=100
# Every rank composes the same config; MOETRAIN_RUN_ID fixes run.dir once for the whole job.
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
export MOETRAIN_RUN_ID="${MOETRAIN_RUN_ID:-$(date +%Y%m%d-%H%M%S)}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m moetrain train "$@"
