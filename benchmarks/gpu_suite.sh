#!/usr/bin/env bash
# The whole GPU suite in one call: build the CUDA module, run every `cuda`-marked test,
# run the GPU benchmarks, and write JSON results.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/latest)
#
# Needs a machine with a GPU, Python with torch (CUDA), triton, pybind11, cmake, ninja,
# pytest and pytest-benchmark; installs nothing from the network. Writes info.json,
# cuda_tests.xml, cuda_tests.log, one bench_<suite>.json per benchmark file, summary.md and
# <date>-<gpu>.json (commit the last one under benchmarks/results/); the build log stays
# in /tmp unless the build fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
status=0
t0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true

echo "== build (CUDA module for \${ATE_FAST_CUDA_ARCHS:-87;89;90})"
if ! ATE_FAST_CUDA=1 ATE_FAST_BUILD_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/ate_fast_build.log 2>&1; then
  tail -40 /tmp/ate_fast_build.log; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s"

"$PY" -m ate_fast.cli info --json >"$OUT_DIR/info.json" && "$PY" -m ate_fast.cli info | tail -8

echo "== cuda-marked tests"
timeout "${ATE_FAST_TEST_TIMEOUT:-180}" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT_DIR/cuda_tests.xml" 2>&1 | tee "$OUT_DIR/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks (one JSON per suite, each under its own time limit)"
for suite in benchmarks/bench_*.py; do
  name=$(basename "$suite" .py)
  timeout "${ATE_FAST_BENCH_TIMEOUT:-110}" "$PY" -m pytest "$suite" -q -p no:cacheprovider \
      -k "cuda" --benchmark-json="$OUT_DIR/$name.json" >"/tmp/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc"
  [ $rc -eq 0 ] || { status=1; tail -15 "/tmp/$name.log"; }
done

"$PY" benchmarks/gpu_summary.py "$OUT_DIR" || status=1
echo "total $(( $(date +%s) - t0 )) s, status $status"
exit $status
