#!/usr/bin/env bash
# The whole GPU suite in one call: build the CUDA module, run every `cuda`-marked test,
# run the GPU benchmarks, and write JSON results.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/latest)
#
# Needs a machine with a GPU, Python with torch (CUDA), triton, pybind11, cmake, ninja,
# pytest and pytest-benchmark; installs nothing from the network. Leaves six files in
# OUT_DIR (the device tool brings back at most eight): <date>-<gpu>.json (commit it under
# benchmarks/results/), summary.md (the real-size report first, ending with the comparison
# against the last committed results for the same GPU, benchmarks/ci_gate.py gpu),
# realsize.json and realsize.md (bench_realsize.py's report), cuda_tests.log and raw.tgz
# (info.json, the cuda tests' JUnit XML, one bench_<suite>.json per benchmark file,
# profile_capture.json, not_run.txt and every log, the build's included).
#
# What a run leaves in OUT_DIR grows as it goes: realsize.json/.md are rewritten there after
# every real-size case, raw.tgz after every step — so a run the device tool kills at its limit
# still returns what it measured (gpu_summary.py on the unpacked raw.tgz rebuilds the rest).
# ATE_FAST_SUITE_BUDGET must stay ≈ 60 s under the device call's limit (timeout_s, or the
# session's device time left, whichever is less: a second call of a session gets less).
#
# Time plan (seconds; the whole script ends by ATE_FAST_SUITE_BUDGET, 470: under 8 minutes,
# build included — the build itself stopped at ATE_FAST_BUILD_TIMEOUT, 240). Every step after
# the build is cut to what the budget leaves:
#   build (3 archs)               ≈ 60  (estimate: the 2026-11-26 H100 run reached its first
#                                        benchmark 189 s in, after ≤ 150 s of tests)
#   bench_realsize.py (first)     ≤ ATE_FAST_REALSIZE_TIMEOUT (240), less if it would leave
#                                   the cuda tests under ATE_FAST_TEST_TIMEOUT plus the final
#                                   reserve; it skips its remaining cases on its own from
#                                   ATE_FAST_REALSIZE_BUDGET_S (20 s before its limit)
#   cuda tests (4 shards)         ≤ ATE_FAST_TEST_TIMEOUT (150; the 498 tests of the H100
#                                   run finished unsharded within its 150 s limit)
#   the other benchmarks          what is left, each ≤ ATE_FAST_BENCH_TIMEOUT (110), the least
#                                   measured first (see `first` below); bench_heads ≤
#                                   ATE_FAST_HEADS_TIMEOUT (300), with ATE_FAST_HEADS_BUDGET_S
#                                   45 s before its limit; profile_capture.py ≤ 60
#   summary, comparison, packing  ATE_FAST_FINAL_RESERVE (25) kept free by every step above
# A step left under 20 s is not run and is listed in not_run.txt and summary.md (a planned
# cut, not a failure: a partial rerun times it). A failed CUDA build is listed there too and
# the suite goes on with the CPU module (the Triton and torch paths still run and time; the
# cuda tests that need the module fail), exit status 1. The cuda tests run as ATE_FAST_TEST_SHARDS
# (4) concurrent pytest processes (most of their time is Triton compiling on the CPU). A
# suite at its limit gets SIGINT, so pytest-benchmark still writes the JSON of what it
# finished (bench_realsize also rewrites realsize.json/.md after every case).
#
# A partial rerun (what a first run did not reach or fix): ATE_FAST_TESTS (pytest paths
# or node ids for the cuda tests, default tests; "none" skips them), ATE_FAST_TESTS_K (a
# pytest -k expression for them) and ATE_FAST_SUITES (benchmark files to run, in that
# order, instead of all; bench_realsize, run before the tests, and bench_heads only if
# named; ATE_FAST_SUITES=none runs none), ATE_FAST_REALSIZE_K (a pytest -k expression that
# picks bench_realsize's cases, e.g. "B8 and compile": what a first run's budget cut) and
# ATE_FAST_BENCH_K (one for the other benchmark files: it also matches a file's name, e.g.
# "bf16 or prefix_attention" keeps bench_transformer_guidance's bf16 rows and all of
# bench_prefix_attention).
set -uo pipefail
cd "$(dirname "$0")/.."
# ATE_FAST_SUITES as paths from the repository's root ("bench_rtc", "bench_rtc.py" and
# "./benchmarks/bench_rtc.py" name the same suite); a name that is none, refused before the
# build rather than after minutes of GPU time
if [ -n "${ATE_FAST_SUITES:-}" ] && [ "$ATE_FAST_SUITES" != none ]; then
  named=""
  for suite in $ATE_FAST_SUITES; do
    path="benchmarks/$(basename "${suite%.py}").py"
    if [ ! -f "$path" ]; then
      echo "ATE_FAST_SUITES: no benchmark file $suite; expected one of:" \
        $(ls benchmarks/bench_*.py) >&2
      exit 2
    fi
    named="$named $path"
  done
  ATE_FAST_SUITES="${named# }"
fi
OUT_DIR="${1:-${OUT:-benchmarks/results/latest}}"
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d /tmp/ate_fast_suite.XXXXXX)  # everything, packed into OUT_DIR at the end
rm -f "$OUT_DIR/cuda_tests.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY="${PYTHON:-python3}"
status=0
t0=$(date +%s)
deadline=$(( t0 + ${ATE_FAST_SUITE_BUDGET:-470} ))
GRACE=10  # seconds between SIGINT and SIGKILL
FINAL=${ATE_FAST_FINAL_RESERVE:-25}  # kept for gpu_summary, the comparison and packing

# capped LIMIT [RESERVE]: LIMIT cut to what the budget leaves after RESERVE, the final
# reserve and the grace
capped() {
  local left=$(( deadline - $(date +%s) - ${2:-0} - FINAL - GRACE ))
  [ "$left" -ge 1 ] || left=1  # never 0: `timeout 0` would mean no limit
  if [ "$1" -le "$left" ]; then echo "$1"; else echo "$left"; fi
}

# bench SUITE LIMIT [VAR=VALUE ...]: one benchmark file (its cuda cases) into
# WORK/<name>.json, stopped by SIGINT after LIMIT seconds.
bench() {
  local suite=$1 limit=$2 name rc k="cuda" pick="${BENCH_K:-${ATE_FAST_BENCH_K:-}}"
  shift 2
  [ -z "$pick" ] || k="cuda and ($pick)"
  name=$(basename "$suite" .py)
  if [ "$limit" -lt 20 ]; then  # a planned cut (see the time plan above), not a failure
    echo "$name: not run (ATE_FAST_SUITE_BUDGET spent, $(( $(date +%s) - t0 )) s into the run)" \
      | tee -a "$WORK/not_run.txt"
    return
  fi
  env "$@" timeout -s INT -k "$GRACE" "$limit" "$PY" -m pytest "$suite" -q -p no:cacheprovider \
      -k "$k" --benchmark-json="$WORK/$name.json" >"$WORK/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # what it finished is in its JSON
    echo "$name: cut at its limit ($limit s)" >>"$WORK/not_run.txt"
  fi
  grep -m1 "plan:" "$WORK/$name.log"  # bench_heads/realsize: cases, compiles, rough time
  echo "$name: exit $rc (limit $limit s, $(( $(date +%s) - t0 )) s into the run):" \
      "$(tail -1 "$WORK/$name.log")"
  # 5: nothing collected (a script such as bench_sampling_cpu.py, or no cuda cases)
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || { status=1; tail -15 "$WORK/$name.log"; }
  checkpoint
}

# checkpoint: everything so far into OUT_DIR/raw.tgz (whole or not at all), so that a run
# killed later still returns it
checkpoint() {
  tar czf "$OUT_DIR/raw.tgz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUT_DIR/raw.tgz.tmp" "$OUT_DIR/raw.tgz"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true

echo "== build (CUDA module for \${ATE_FAST_CUDA_ARCHS:-87;89;90})"
if ! ATE_FAST_CUDA=1 ATE_FAST_BUILD_JOBS="$(nproc)" timeout -k 10 "${ATE_FAST_BUILD_TIMEOUT:-240}" \
    "$PY" -m pip install --no-build-isolation --no-deps -e . >"$WORK/build.log" 2>&1; then
  # the session's GPU time is spent either way: without the CUDA module the Triton and
  # torch paths still run and time (the cuda tests that need it fail and say so)
  tail -40 "$WORK/build.log"; cp "$WORK/build.log" "$OUT_DIR/"; status=1
  echo "CUDA BUILD FAILED ($(( $(date +%s) - t0 )) s): continuing with the CPU module only" \
    | tee -a "$WORK/not_run.txt"
  if ! ATE_FAST_CUDA=0 ATE_FAST_BUILD_JOBS="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-deps -e . >"$WORK/build_cpu.log" 2>&1; then
    tail -20 "$WORK/build_cpu.log"; echo "BUILD FAILED"; cp "$WORK/build_cpu.log" "$OUT_DIR/"
    exit 1
  fi
fi
echo "built in $(( $(date +%s) - t0 )) s"
checkpoint

"$PY" -m ate_fast.cli info --json >"$WORK/info.json" && "$PY" -m ate_fast.cli info | tail -8
# the CPU tests compile every kernel with the Triton pinned in tests/gpu_image_triton.txt:
# say so where this machine's differs, so that the pin follows the machine
pinned=$(sed -n 's/^triton==//p' tests/gpu_image_triton.txt)
here=$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo none)
[ "$here" = "$pinned" ] || echo "NOTE: triton $here here, $pinned in tests/gpu_image_triton.txt:" \
  "update the pin"

realsize=benchmarks/bench_realsize.py
# 150: on the H200 (2026-12-04) three of four shards took 49-116 s and the fourth was cut at
# 120 s, ≈ 150 tests in (the cuda tests grow with every kernel)
test_limit=${ATE_FAST_TEST_TIMEOUT:-150}
[ "${ATE_FAST_TESTS:-tests}" != none ] || test_limit=0
case " ${ATE_FAST_SUITES:-$realsize} " in
  *" $realsize "*)
    # first: the issue's real-size targets, and the longest compiles (max-autotune)
    echo "== real size (bench_realsize.py: pi0-expert bf16, 816-token prefix cache)"
    limit=$(capped "${ATE_FAST_REALSIZE_TIMEOUT:-240}" "$test_limit")
    # its report straight into OUT_DIR, rewritten after every case
    BENCH_K="${ATE_FAST_REALSIZE_K:-}" bench "$realsize" "$limit" \
      ATE_FAST_REALSIZE_BUDGET_S=$(( limit - 20 )) ATE_FAST_REALSIZE_OUT="$OUT_DIR"
    sed -n '/^Targets/,$p' "$OUT_DIR/realsize.md" 2>/dev/null ;;
esac

echo "== cuda-marked tests"
limit=$(capped "$test_limit")
if [ "${ATE_FAST_TESTS:-tests}" = none ]; then
  echo "cuda tests: not run (ATE_FAST_TESTS=none)" >>"$WORK/not_run.txt"
elif [ "$limit" -lt 20 ]; then  # a planned cut, as in bench()
  echo "cuda tests: not run (ATE_FAST_SUITE_BUDGET spent, $(( $(date +%s) - t0 )) s into the run)" \
    | tee -a "$WORK/not_run.txt"
else
  shards=${ATE_FAST_TEST_SHARDS:-4}
  pids=()
  for (( i = 0; i < shards; i++ )); do
    # shellcheck disable=SC2086  # ATE_FAST_TESTS is a list of paths / node ids
    ATE_FAST_TEST_SHARD="$i/$shards" timeout -s INT -k "$GRACE" "$limit" \
      "$PY" -m pytest ${ATE_FAST_TESTS:-tests} -m cuda -k "${ATE_FAST_TESTS_K:-}" -q -rfE --tb=short \
      -p no:cacheprovider --continue-on-collection-errors \
      --junitxml="$WORK/cuda_tests-$i.xml" >"$WORK/cuda_tests-$i.log" 2>&1 &
    pids+=($!)
  done
  for (( i = 0; i < shards; i++ )); do
    wait "${pids[$i]}"
    rc=$?  # 5: a shard with no test selected (a partial rerun)
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1
    # each shard's last 3 MB (the device tool returns files up to 16 MiB; raw.tgz has all)
    size=$(stat -c %s "$WORK/cuda_tests-$i.log")
    { echo "== shard $i/$shards"
      [ "$size" -le 3000000 ] || echo "(its first $(( size - 3000000 )) bytes cut: raw.tgz has all)"
      tail -c 3000000 "$WORK/cuda_tests-$i.log"; } >>"$OUT_DIR/cuda_tests.log"
    grep -h "^FAILED\|^ERROR" "$WORK/cuda_tests-$i.log" | head -20
    echo "shard $i/$shards: $(tail -1 "$WORK/cuda_tests-$i.log")"
  done
  checkpoint
fi

echo "== benchmarks (one JSON per suite, each under its own time limit)"
heads=benchmarks/bench_heads.py
# the suites with rows no GPU has timed yet (the prefix attention's sweep, RTC, graphed
# guidance backends, the compiled transformer VJP), then bench_sampling (not reached by the
# last full run), the heads (timed on the H100, 110 of 195 cases), the rest
first="benchmarks/bench_prefix_attention.py benchmarks/bench_rtc.py benchmarks/bench_guidance.py benchmarks/bench_transformer_guidance.py benchmarks/bench_sampling.py"
others=$(ls benchmarks/bench_*.py | grep -v -e "$heads" -e "$realsize")
suites="${ATE_FAST_SUITES:-$first $heads $others}"
[ "$suites" != none ] || suites=""
seen=" $realsize "  # run before the tests, when named
for suite in $suites; do
  case "$seen" in *" $suite "*) continue ;; esac
  seen="$seen$suite "
  if [ "$suite" = "$heads" ]; then
    heads_limit=$(capped "${ATE_FAST_HEADS_TIMEOUT:-300}")
    # its own budget ends 45 s before the limit: under 20 s of it, not run (bench's cut)
    [ "$heads_limit" -ge 65 ] || heads_limit=0
    bench "$heads" "$heads_limit" ATE_FAST_HEADS_BUDGET_S=$(( heads_limit - 45 ))
  else
    bench "$suite" "$(capped "${ATE_FAST_BENCH_TIMEOUT:-110}")"
  fi
done

# kernels per captured call and their device time (the open item of the first H100 run)
limit=$(capped 60)
if [ "$limit" -ge 20 ]; then
  timeout -s INT -k "$GRACE" "$limit" "$PY" benchmarks/profile_capture.py "$WORK" \
      >"$WORK/profile_capture.log" 2>&1 || { status=1; tail -5 "$WORK/profile_capture.log"; }
  tail -3 "$WORK/profile_capture.log"
  checkpoint
else
  echo "profile_capture: not run (ATE_FAST_SUITE_BUDGET spent)" | tee -a "$WORK/not_run.txt"
fi

# bench_realsize wrote its report into OUT_DIR (above); gpu_summary reads it beside the rest
cp "$OUT_DIR"/realsize.json "$OUT_DIR"/realsize.md "$WORK"/ 2>/dev/null
"$PY" benchmarks/gpu_summary.py "$WORK" || status=1

# the new results against the last committed ones for this GPU (benchmarks/ci_gate.py gpu;
# appended to summary.md). Advisory: its verdict never changes the suite's status or stops
# the outputs below from being written.
new_results=$(ls "$WORK"/20*.json 2>/dev/null | head -1)
if [ -n "$new_results" ]; then
  timeout -k 5 "$(( FINAL > 10 ? FINAL - 5 : 5 ))" "$PY" benchmarks/ci_gate.py gpu "$new_results" \
      --out-md "$WORK/gpu_compare.md" >"$WORK/gpu_compare.log" 2>&1
  echo "gpu comparison with the committed results: exit $? ($(head -1 "$WORK/gpu_compare.log"))"
  { echo; cat "$WORK/gpu_compare.md"; } >>"$WORK/summary.md" 2>/dev/null
fi
cp "$WORK"/summary.md "$WORK"/20*.json "$OUT_DIR"/ 2>/dev/null
checkpoint
echo "total $(( $(date +%s) - t0 )) s, status $status; in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $status
