#!/usr/bin/env bash
# Fills .whl/ (git ignores it) with the wheels that the lent GPU machine's image lacks, for its Python 3.12 on
# manylinux x86_64: moetrain's config stack (hydra-core, omegaconf, antlr4-python3-runtime; PyYAML and packaging are
# in the image). Run here, where pip reaches a registry; the GPU call carries .whl and benchmarks/gpu.sh installs
# them with --no-index. The versions are the ones this project's tests run with.
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
rm -f .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl  # one version of each
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl hydra-core==1.3.8 omegaconf==2.3.1
# NOTE: antlr4-python3-runtime 4.9.3 (the version omegaconf 2.3 pins) is published as a source archive only; it is
# pure Python, so the wheel built here from it installs on any Python 3.
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
