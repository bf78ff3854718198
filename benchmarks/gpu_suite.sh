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
#
# Time limits (seconds): every step after the build is cut so that the script ends by
# ATE_FAST_SUITE_BUDGET (470: under 8 minutes, build included). The cuda tests get
# ATE_FAST_TEST_TIMEOUT (180); bench_heads.py (the newest suite) runs first of the
# benchmarks with ATE_FAST_HEADS_TIMEOUT (300), less if it would leave the other suites
# under ATE_FAST_BENCH_RESERVE (120) together; they get ATE_FAST_BENCH_TIMEOUT (110) each,
# cut to what is left, bench_transformer_guidance.py (never run on a GPU yet) first. A suite at its limit gets SIGINT, so pytest-benchmark still writes the
# JSON of what it finished (bench_heads also skips its remaining cases on its own, from
# ATE_FAST_HEADS_BUDGET_S, 45 s before its limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
status=0
t0=$(date +%s)
deadline=$(( t0 + ${ATE_FAST_SUITE_BUDGET:-470} ))
GRACE=10  # seconds between SIGINT and SIGKILL

# capped LIMIT [RESERVE]: LIMIT cut to what the budget leaves after RESERVE (and the grace)
capped() {
  local left=$(( deadline - $(date +%s) - ${2:-0} - GRACE ))
  [ "$left" -ge 1 ] || left=1  # never 0: `timeout 0` would mean no limit
  if [ "$1" -le "$left" ]; then echo "$1"; else echo "$left"; fi
}

# bench SUITE LIMIT [VAR=VALUE ...]: one benchmark file (its cuda cases) into
# OUT_DIR/<name>.json, stopped by SIGINT after LIMIT seconds.
bench() {
  local suite=$1 limit=$2 name rc
  shift 2
  name=$(basename "$suite" .py)
  if [ "$limit" -lt 20 ]; then
    echo "$name: not run (ATE_FAST_SUITE_BUDGET spent)"; status=1; return
  fi
  env "$@" timeout -s INT -k "$GRACE" "$limit" "$PY" -m pytest "$suite" -q -p no:cacheprovider \
      -k "cuda" --benchmark-json="$OUT_DIR/$name.json" >"/tmp/$name.log" 2>&1
  rc=$?
  grep -m1 "plan:" "/tmp/$name.log"  # bench_heads: cases, torch.compile count, rough time
  echo "$name: exit $rc (limit $limit s, $(( $(date +%s) - t0 )) s into the run):" \
      "$(tail -1 "/tmp/$name.log")"
  # 5: nothing collected (a script such as bench_sampling_cpu.py, or no cuda cases)
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || { status=1; tail -15 "/tmp/$name.log"; }
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true

echo "== build (CUDA module for \${ATE_FAST_CUDA_ARCHS:-87;89;90})"
if ! ATE_FAST_CUDA=1 ATE_FAST_BUILD_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/ate_fast_build.log 2>&1; then
  tail -40 /tmp/ate_fast_build.log; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 )) s"

"$PY" -m ate_fast.cli info --json >"$OUT_DIR/info.json" && "$PY" -m ate_fast.cli info | tail -8

echo "== cuda-marked tests"
timeout -s INT -k "$GRACE" "$(capped "${ATE_FAST_TEST_TIMEOUT:-180}")" "$PY" -m pytest tests -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT_DIR/cuda_tests.xml" 2>&1 | tee "$OUT_DIR/cuda_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks (one JSON per suite, each under its own time limit)"
heads=benchmarks/bench_heads.py
heads_limit=$(capped "${ATE_FAST_HEADS_TIMEOUT:-300}" "${ATE_FAST_BENCH_RESERVE:-120}")
bench "$heads" "$heads_limit" ATE_FAST_HEADS_BUDGET_S=$(( heads_limit - 45 ))
# the transformer-encoder guidance paths next (not yet measured on a GPU), then the rest
first=benchmarks/bench_transformer_guidance.py
for suite in "$first" benchmarks/bench_*.py; do
  [ "$suite" = "$heads" ] && continue
  [ "$suite" = "$first" ] && [ -n "${seen_first:-}" ] && continue
  [ "$suite" = "$first" ] && seen_first=1
  bench "$suite" "$(capped "${ATE_FAST_BENCH_TIMEOUT:-110}")"
done

# kernels per captured call and their device time (the open item of the first H100 run)
timeout -s INT -k "$GRACE" "$(capped 60)" "$PY" benchmarks/profile_capture.py "$OUT_DIR" \
    >/tmp/profile_capture.log 2>&1 || { status=1; tail -5 /tmp/profile_capture.log; }
tail -3 /tmp/profile_capture.log

"$PY" benchmarks/gpu_summary.py "$OUT_DIR" || status=1
echo "total $(( $(date +%s) - t0 )) s, status $status"
exit $status
