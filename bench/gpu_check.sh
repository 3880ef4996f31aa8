#!/usr/bin/env bash
# The one script for a lent H100/H200: install with the machine's own torch (CUDA part built),
# run tests/gpu, benchmark the GPU path against torch, print a table last, write CSV and logs to
# $OUT. Every step runs under a time limit cut from one overall budget (under 8 minutes), so a
# failing or slow step still leaves the others' results.
#
#   bash bench/gpu_check.sh             # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run   # print the steps and their limits; runs nothing
set -u

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET=${CBIR_GPU_CHECK_BUDGET:-470}   # seconds for all steps together
START=$SECONDS
mkdir -p "$OUT"
declare -a SUMMARY=()

# run NAME CAP_SECONDS LOG COMMAND...: runs under min(CAP, what is left of the budget).
run() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] $name (limit ${cap}s): $*"
    SUMMARY+=("$name: dry-run")
    return 0
  fi
  if [ "$limit" -le 5 ]; then
    echo "== $name: skipped, budget spent"
    SUMMARY+=("$name: skipped (budget spent)")
    return 0
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  local took=$((SECONDS - t0))
  tail -n 15 "$OUT/$log"
  case $rc in
    0) SUMMARY+=("$name: ok (${took}s)") ;;
    124 | 137) SUMMARY+=("$name: TIMED OUT after ${took}s (see $log)") ;;
    *) SUMMARY+=("$name: FAILED rc=$rc (${took}s, see $log)") ;;
  esac
  return 0
}

if [ "$DRY" = 0 ]; then
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
    nvcc --version 2>&1 | tail -1
  } | tee "$OUT/machine.txt"
fi

export CBIR_ENGINE_CUDA=1 CBIR_ENGINE_CUDA_ARCHS=${CBIR_ENGINE_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
run install 200 install.log bash -c "$PY -m pip install --no-build-isolation --no-deps -e . \
  && { [ -f cbir_engine/libcbir_cuda.so ] || $PY setup.py -q build_ext --inplace; } \
  && $PY -c 'import cbir_engine, cbir_engine._C; from cbir_engine.gpu import cuda_lib; print(\"CUDA library:\", cuda_lib.PACKAGED.exists())'"
run tests 170 tests.log env CBIR_GPU_TEST_NETWORKS=${CBIR_GPU_TEST_NETWORKS:-resnet50} \
  $PY -m pytest -q -p no:cacheprovider --timeout=90 tests/gpu
run bench 280 bench.log $PY bench/bench_gpu.py --out "$OUT/gpu.csv" ${CBIR_BENCH_ARGS:-}
if [ "$DRY" = 1 ]; then
  # The benchmark's plan (argument checks included) needs no GPU.
  $PY bench/bench_gpu.py --dry-run ${CBIR_BENCH_ARGS:-} || SUMMARY+=("bench plan: FAILED")
fi

echo
echo "== summary ($((SECONDS - START))s of ${BUDGET}s)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [ -f "$OUT/tests.log" ]; then
  echo "  tests: $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.log" | tail -1)"
fi
# The table last: the reply carries the end of the output.
if [ -f "$OUT/bench.log" ] && grep -q '^subject' "$OUT/bench.log"; then
  echo
  sed -n '/^subject/,$p' "$OUT/bench.log"
elif [ -f "$OUT/gpu.csv" ]; then
  echo
  column -s, -t <"$OUT/gpu.csv" | cut -c1-160
fi
exit 0
