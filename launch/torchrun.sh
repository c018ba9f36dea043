#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes on CPU with gloo):
#   bash launch/torchrun.sh model=proxy data=synthetic train.global_batch_size=64 train.micro_batch_size=8
# run.dir depends only on the command, so every rank agrees and running it again continues the run.
# SIGUSR1 or SIGTERM to torchrun reaches every worker (torch >= 2.10): each checkpoints at its next step and exits
# 0 (torchrun itself exits 1 after a signal it handled).
# MOETRAIN_MAX_RESTARTS=N: torchrun restarts every worker after a failure (a lost rank, a refused rendezvous) up to
# N times; the restarted workers resume from the last complete checkpoint in run.dir (default 0). Each attempt gets
# a new rendezvous store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): with the shared one a restarted worker can reach
# its predecessors' addresses and fail or hang (pytorch#135712; moetrain.parallel.dist).
set -euo pipefail
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
flags=(--max-restarts "${MOETRAIN_MAX_RESTARTS:-0}")
torchrun_help=$(torchrun --help 2>&1 || true)
if grep -q -- "--signals-to-handle" <<<"$torchrun_help"; then
  flags+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
fi
if grep -q -- "--shutdown-timeout" <<<"$torchrun_help"; then
  flags+=(--shutdown-timeout "${MOETRAIN_SHUTDOWN_S:-280}")
fi
exec torchrun --standalone --nproc-per-node "$NPROC" "${flags[@]}" -m moetrain train "$@"
