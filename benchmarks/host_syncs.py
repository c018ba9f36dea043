"""Host syncs per training step of the tiny model in one process (moetrain.host_syncs' counter), by operation:
what a GPU would wait for. Prints JSON; the sync budget itself is tested in tests/test_host_syncs.py.

    python benchmarks/host_syncs.py [overrides...]
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import warnings

from moetrain.config import compose, to_job_config
from moetrain.host_syncs import HostSyncCounter
from moetrain.model.balance import routers
from moetrain.train import Trainer

RUN = ["logging.console=false", "train.val_interval=0", "data.demo_bytes=200000", "train.seq_len=64",
       "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=5"]


def main(overrides: list[str]) -> dict:
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        trainer = Trainer(to_job_config(compose([f"run.dir={tmp}/run", *RUN, *overrides])))
        steps = []
        for _ in range(3):
            trainer.step += 1
            with HostSyncCounter() as syncs:
                stats = trainer.train_step()
            steps.append(dict(syncs.by_op))
        with HostSyncCounter() as syncs:
            trainer.log_step(stats, 1.0)
        result = {"moe_layers": len(routers(trainer.model)), "micro_batches_per_step": 2, "steps": steps,
                  "log_step": dict(syncs.by_op)}
        trainer.close()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
