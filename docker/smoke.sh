#!/usr/bin/env bash
# A quick check of an image: a few demo steps on the first GPU (or the CPU), then the CPU test suite's core.
set -euo pipefail
moetrain train train.steps=20 logging.interval=5 run.dir=/tmp/moetrain-smoke
python -m pytest -q tests/test_hf_parity.py tests/test_model.py
