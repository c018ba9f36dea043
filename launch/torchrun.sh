#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes on CPU with gloo):
#   bash launch/torchrun.sh model=proxy data=synthetic train.steps=100
# run.dir depends only on the command, so every rank agrees and running it again continues the run.
# SIGUSR1 or SIGTERM to torchrun reaches every worker: each checkpoints at its next step and exits 0.
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec torchrun --standalone --nproc-per-node "$NPROC" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${MOETRAIN_SHUTDOWN_S:-600}" \
  -m moetrain train "$@"
