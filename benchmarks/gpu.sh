#!/usr/bin/env bash
# The GPU check: one call on a bare lent GPU machine (one H100/H200, no network), from the repository root, with
# $OUT set; under 8 minutes. Here first: `bash benchmarks/gpu_wheels.sh` fills .whl/ (git ignores it) with the
# wheels the machine's image lacks (hydra-core, omegaconf, antlr4); the call carries .whl and this script installs
# them when the modules are missing. Transformer Engine is optional (../shared/gpu/README.md): without it the TE rows
# are listed as skipped with the reason.
#   bash benchmarks/gpu.sh               # on the GPU: model=proxy_1gpu, data=synthetic, seq 4096, micro-batch 2
#   bash benchmarks/gpu.sh --cpu-smoke   # the same steps at tiny shapes on CPU (tests/test_gpu_script.py)
# Steps: a preflight that fails within seconds naming what is missing; the GPU tests (not in --cpu-smoke);
# moetrain's Trainer and transformers' DeepseekV3ForCausalLM of the same shape, each in its own process, side by
# side (tokens/s, TFLOP/s, host syncs per step); bf16 against the FP8 rows the preflight allows. A failing step is
# recorded and the next one still runs; the exit status is 0 only if every step ran and passed.
# Writes to $OUT (6 files): machine.txt, preflight.json, gpu.log, train_step.json, attention.json (GPU only: SDPA
# against compiled FlexAttention per mask), fp8_step.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
smoke=0
case "${1:-}" in
  --cpu-smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"  # the GPU machine's python3 is the one with torch
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$OUT/gpu.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

# Wheels carried in .whl/ (benchmarks/gpu_wheels.sh), installed only where the modules are missing.
site="${MOETRAIN_WHEEL_SITE:-/tmp/moetrain-site}"
if [ "$smoke" = 0 ] && ! "$PY" -c "import hydra, omegaconf, antlr4" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null
then
  say "== wheels: installing .whl/*.whl into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    2>&1 | tee -a "$log"
  export PYTHONPATH="$PYTHONPATH:$site"
fi

say "== preflight"
preflight=(--machine "$OUT/machine.txt" --json "$OUT/preflight.json")
[ "$smoke" = 1 ] && preflight+=(--cpu)
if ! "$PY" benchmarks/preflight.py "${preflight[@]}" 2>&1 | tee -a "$log"; then
  say "gpu.sh: preflight failed (above); no step was run"
  exit 2
fi

failed=()
step() {  # step NAME SECONDS COMMAND...: run it, record whether it passed and how long it took
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  say "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then say "== $name: passed in $((SECONDS - t0)) s"
  else say "== $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", over its ${limit} s")) in $((SECONDS - t0)) s"
       failed+=("$name"); fi
}

if [ "$smoke" = 1 ]; then
  say "== tests: skipped in --cpu-smoke (CI runs the test suite itself)"
  shape=(--batch 2 --seq 32)  # seconds of CI: the fewest steps that give every number
  step train_step 300 "$PY" benchmarks/train_step.py --model tiny "${shape[@]}" --steps 1 --rounds 1 \
    --json "$OUT/train_step.json"
  # NOTE: the tests' demo size (conftest.SMALL_RUN): CI has it cached; a first 1 MB one takes seconds to prepare
  step fp8_step 300 "$PY" benchmarks/fp8_step.py --size tiny "${shape[@]}" --steps 2 --plan "$OUT/preflight.json" \
    --json "$OUT/fp8_step.json" data.demo_bytes=200000
else
  # The GPU tests (TE against bf16, skipped, saying why, where the preflight found no TE; native FP8's blockwise
  # and grouped scaled kernels against its emulation) and the model tests under this machine's torch and
  # transformers. NOTE: not test_precision's training tests: with a GPU they would train on it (train.device=auto),
  # their 4-rank layouts on one device; CI runs them on CPU.
  step tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_precision.py::test_te_linear_and_experts_track_bf16 \
    tests/test_fp8_gemm.py::test_blockwise_scaled_mm_matches_the_emulation_on_hopper \
    tests/test_fp8_gemm.py::test_scaled_grouped_mm_matches_the_per_expert_kernels_on_hopper \
    tests/test_precision.py::test_te_recomputation_gives_the_gradients_of_no_recomputation \
    tests/test_precision.py::test_tf32_only_where_asked_for tests/test_hf_parity.py tests/test_model.py \
    tests/test_experts.py tests/test_attention.py
  step train_step 150 "$PY" benchmarks/train_step.py --model proxy_1gpu --batch 2 --seq 4096 --steps 3 --rounds 2 \
    --sync-steps 2 --json "$OUT/train_step.json"
  step attention 90 "$PY" benchmarks/attention.py --seq 4096 --batch 2 --heads 16 --json "$OUT/attention.json"
  # NOTE: micro-batch 1: the native row's emulated GEMMs (the proxy's dense MLP and wkv_a, whose features the
  # blockwise kernel does not take; all of them if a kernel fails its start-up probe) save fp32 operands.
  step fp8_step 150 "$PY" benchmarks/fp8_step.py --size proxy_1gpu --batch 1 --seq 4096 --steps 30 \
    --plan "$OUT/preflight.json" --json "$OUT/fp8_step.json"
fi

if [ "${#failed[@]}" -eq 0 ]; then say "gpu.sh: every step passed"; exit 0; fi
say "gpu.sh: FAILED: ${failed[*]}"
exit 1
