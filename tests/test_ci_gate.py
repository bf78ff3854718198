"""The latency gate's comparison logic (benchmarks/ci_gate.py) on fixed JSON: nothing is
timed here. GPU: the committed H100 results against themselves and doctored copies; CPU:
a pytest-benchmark JSON written out by hand."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH_DIR / "results"
H100 = "NVIDIA H100 80GB HBM3"
HEADS = RESULTS / "2026-11-26-nvidia-h100-80gb-hbm3-heads.json"
# a row of ≥ 100 µs (the GPU's work decides it) and a launch-bound one, both in HEADS
SLOW_ROW = ("cuda flow-transformer-small flow-euler-10 mlp-guided B=1 H=50 D=32", "ate_capture")
FAST_ROW = ("cuda float32 euler 1x50x32", "cuda")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


gate = _load("ci_gate")
THRESHOLDS = json.loads((BENCH_DIR / "ci_thresholds.json").read_text())


# ------------------------------------------------------------------------------ gpu
def _slowed(data: dict, problem: str, row: str, factor: float) -> dict:
    doctored = copy.deepcopy(data)
    doctored[gate.TABLE][problem][row] *= factor
    return doctored


@pytest.fixture(scope="module")
def heads() -> dict:
    return json.loads(HEADS.read_text())


def test_gpu_identical_results_pass(heads):
    result = gate.compare_gpu(heads, [(HEADS.name, heads)], THRESHOLDS["gpu"])
    assert result["ok"] and not result["failures"]
    assert len(result["rows"]) > 100
    assert all(row.change == 1.0 for row in result["rows"])
    assert not result["new_only"] and not result["old_only"]


def test_gpu_twice_slower_row_fails_and_is_named(heads):
    problem, row = SLOW_ROW
    assert heads[gate.TABLE][problem][row] >= THRESHOLDS["gpu"]["launch_bound_s"]
    new = _slowed(heads, problem, row, 2.0)
    result = gate.compare_gpu(new, [(HEADS.name, heads)], THRESHOLDS["gpu"])
    assert not result["ok"]
    assert len(result["failures"]) == 1
    message = result["failures"][0]
    assert problem in message and row in message and "2.00× slower" in message
    assert result["rows"][0].problem == problem and not result["rows"][0].ok
    text = gate.gpu_markdown(result, "new.json", [HEADS.name])
    assert "FAILED" in text and f"- {problem} / {row}" in text


def test_gpu_launch_bound_rows_get_the_looser_limit(heads):
    problem, row = FAST_ROW
    assert heads[gate.TABLE][problem][row] < THRESHOLDS["gpu"]["launch_bound_s"]
    twice = gate.compare_gpu(_slowed(heads, problem, row, 2.0), [("a", heads)], THRESHOLDS["gpu"])
    assert twice["ok"]
    four = gate.compare_gpu(_slowed(heads, problem, row, 4.0), [("a", heads)], THRESHOLDS["gpu"])
    assert [f.split(":")[0] for f in four["failures"]] == [f"{problem} / {row}"]


def test_gpu_slower_baseline_row_is_not_a_regression(heads):
    problem, _ = SLOW_ROW
    new = _slowed(heads, problem, "eager", 2.0)
    assert gate.compare_gpu(new, [("a", heads)], THRESHOLDS["gpu"])["ok"]


def test_gpu_newest_committed_file_counts_per_row(heads):
    problem, row = SLOW_ROW
    old = _slowed(heads, problem, row, 0.4)  # the row was 2.5× faster in the older file
    result = gate.compare_gpu(heads, [("old", old), ("newer", heads)], THRESHOLDS["gpu"])
    assert result["ok"]
    result = gate.compare_gpu(heads, [("newer", heads), ("old", old)], THRESHOLDS["gpu"])
    assert result["failures"] and "(old)" in result["failures"][0]


def test_gpu_rows_on_one_side_only_are_listed(heads):
    problem, row = SLOW_ROW
    new = copy.deepcopy(heads)
    del new[gate.TABLE][problem][row]
    new[gate.TABLE]["cuda new problem"] = {"eager": 1e-3, "fused": 5e-4}
    result = gate.compare_gpu(new, [("a", heads)], THRESHOLDS["gpu"])
    assert result["ok"]
    assert result["old_only"] == [(problem, row)]
    assert result["new_only"] == [("cuda new problem", "fused")]


def test_committed_results_same_gpu_oldest_first(tmp_path):
    def write(name, gpu, date):
        (tmp_path / name).write_text(json.dumps({"gpu": gpu, "date": date, gate.TABLE: {}}))

    write("2026-12-01-h100-b.json", H100, "2026-12-01")
    write("2026-11-30-h100.json", H100, "2026-11-30")
    write("2026-12-01-h100-a.json", H100, "2026-12-01")
    write("2026-12-01-orin.json", "Orin", "2026-12-01")
    write("2026-12-02-h100-new.json", H100, "2026-12-02")
    (tmp_path / "ci-latest.json").write_text(json.dumps({"cases": {}}))
    found = gate.committed_results(tmp_path, H100, exclude=tmp_path / "2026-12-02-h100-new.json")
    # no git here: by date, then by name
    assert [p.name for p in found] == [
        "2026-11-30-h100.json", "2026-12-01-h100-a.json", "2026-12-01-h100-b.json",
    ]  # fmt: skip


def test_gpu_cli_exit_codes(tmp_path, heads):
    problem, row = SLOW_ROW
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(_slowed(heads, problem, row, 2.0)))
    md = tmp_path / "compare.md"
    assert gate.main(["gpu", str(HEADS), "--baseline", str(HEADS), "--out-md", str(md)]) == 0
    assert "passed" in md.read_text()
    assert gate.main(["gpu", str(doctored), "--baseline", str(HEADS), "--out-md", str(md)]) == 1
    assert problem in md.read_text()


# ------------------------------------------------------------------------------ cpu
def _bench_json(cases: dict[str, list[tuple[float, float]]]) -> dict:
    """pytest-benchmark JSON: per case, one (baseline min s, candidate min s) per chunk."""
    benchmarks = []
    for case, chunks in cases.items():
        for chunk, times in enumerate(chunks):
            for role, impl, t in zip(("baseline", "candidate"), ("ref", "default"), times):
                benchmarks.append({
                    "name": f"test_ci_gate[{case}-{chunk}-{role}]",
                    "extra_info": {"case": case, "chunk": chunk, "role": role, "impl": impl},
                    "stats": {"min": t, "median": t * 1.2, "rounds": 10},
                })  # fmt: skip
    return {"benchmarks": benchmarks, "machine_info": {}, "commit_info": {}}


def test_cpu_ratio_is_the_median_chunk_of_min_ratios():
    bench = _bench_json({"a": [(3e-3, 1e-3), (2e-3, 1e-3), (9e-3, 1e-3), (4e-3, 2e-3)]})
    case = gate.cpu_cases(bench)["a"]
    assert case.chunk_ratios == [3.0, 2.0, 9.0, 2.0]
    assert case.ratio == 2.5  # the median: one chunk whose halves met different load is out
    assert (case.baseline_min_s, case.candidate_min_s) == (2e-3, 1e-3)
    assert (case.baseline, case.candidate, case.rounds) == ("ref", "default", 40)


def test_cpu_judge():
    thresholds = {"cpu": {"fast": {"min_ratio": 2.0}, "slow": {"min_ratio": 2.0},
                          "lost": {"min_ratio": 1.1}}}  # fmt: skip
    bench = _bench_json({
        "fast": [(3e-3, 1e-3)] * 3, "slow": [(1e-3, 1e-3)] * 3, "new": [(2e-3, 1e-3)],
    })  # fmt: skip
    verdicts = {v.case: v for v in gate.judge_cpu(gate.cpu_cases(bench), thresholds)}
    assert verdicts["fast"].ok and verdicts["fast"].ratio == 3.0
    assert not verdicts["slow"].ok and "REGRESSION" in verdicts["slow"].message
    assert not verdicts["lost"].ok and "did not run" in verdicts["lost"].message
    assert not verdicts["new"].ok and "no min_ratio" in verdicts["new"].message


def test_cpu_chunk_without_both_roles_is_ignored():
    bench = _bench_json({"a": [(2e-3, 1e-3)], "b": [(2e-3, 1e-3)]})
    bench["benchmarks"] = [b for b in bench["benchmarks"] if b["extra_info"]["case"] == "a"
                           or b["extra_info"]["role"] == "baseline"]  # fmt: skip
    assert set(gate.cpu_cases(bench)) == {"a"}


def test_cpu_cli_writes_reports_and_fails_on_regression(tmp_path):
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"cpu": {"a": {"min_ratio": 1.5, "measured": [2.0]}}}))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_bench_json({"a": [(2e-3, 1e-3)]})))
    bad.write_text(json.dumps(_bench_json({"a": [(1.2e-3, 1e-3)]})))
    args = ["cpu", "--thresholds", str(thresholds), "--out-dir", str(tmp_path), "--json"]
    assert gate.main([*args, str(good)]) == 0
    report = json.loads((tmp_path / "ci-latest.json").read_text())
    assert report["passed"] and report["cases"]["a"]["ratio"] == 2.0
    assert gate.main([*args, str(bad)]) == 1
    report = json.loads((tmp_path / "ci-latest.json").read_text())
    assert not report["passed"]
    md = (tmp_path / "ci-latest.md").read_text()
    assert "FAILED" in md and "**REGRESSION**" in md
    assert "2.000 (-40 %)" in md  # against the previous run's ci-latest.json (and recorded)
    # a run that wrote no benchmark JSON left the earlier run's report as the latest
    assert gate.main([*args, str(tmp_path / "missing.json")]) == 1
    md = (tmp_path / "ci-latest.md").read_text()
    assert md.startswith("# CPU latency gate: FAILED") and "missing.json was not written" in md


def test_recorded_ratio_is_the_measured_median_or_one_machines():
    """``ci-latest.md``'s "recorded" column: the median of ``measured``, else of the first
    ``measured_<machine>`` list (a case measured on one other machine only), else none."""
    assert gate._reference_ratio({"measured": [1.0, 3.0, 2.0], "measured_amd": [9.0]}) == 2.0
    assert gate._reference_ratio({"min_ratio": 1.1, "measured_amd": [1.25, 1.75]}) == 1.5
    assert gate._reference_ratio({"min_ratio": 1.1}) is None


def test_thresholds_sit_between_measured_and_regressed_ratios():
    """Each CPU threshold is under every ratio recorded for healthy code and over every
    ratio recorded with a simulated regression, as its reason says; each case was run at
    least 3 times on some machine (a case added later may have one machine's runs only)."""
    for name, entry in THRESHOLDS["cpu"].items():
        runs = [len(entry[k]) for k in entry if k.startswith("measured")]
        assert entry["reason"] and runs and max(runs) >= 3, name
        for key in (k for k in entry if k.startswith("measured")):  # every machine's runs
            assert entry["min_ratio"] < min(entry[key]), (name, key)
        for key in (k for k in entry if k.startswith("regressed")):
            for regression, ratios in entry[key].items():
                assert entry["min_ratio"] > max(ratios), (name, key, regression)
    gpu = THRESHOLDS["gpu"]
    assert 1 < gpu["max_slowdown"] < 2 < gpu["max_slowdown_launch_bound"] and gpu["reason"]


def test_thresholds_cover_exactly_the_gate_cases(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench module adds benchmarks/
    monkeypatch.setitem(sys.modules, "bench_ci_gate", None)
    bench = _load("bench_ci_gate")
    assert bench.CASES and sorted(bench.CASES) == sorted(THRESHOLDS["cpu"])


def test_cpu_failed_benchmark_run_fails_the_gate():
    bench = _bench_json({"a": [(2e-3, 1e-3)]})
    cases = gate.cpu_cases(bench)
    thresholds = {"cpu": {"a": {"min_ratio": 1.5}}}
    verdicts = gate.judge_cpu(cases, thresholds)
    assert all(v.ok for v in verdicts)
    text = gate.cpu_markdown(cases, verdicts, thresholds, None, 20.0, "pytest exit 1")
    assert text.startswith("# CPU latency gate: FAILED") and "pytest exit 1" in text


# ------------------------------------------------------------- cpu: failures confirmed
def _cases(ratios: dict[str, float]) -> dict:
    return gate.cpu_cases(_bench_json({n: [(r * 1e-3, 1e-3)] for n, r in ratios.items()}))


def test_cpu_case_below_threshold_is_timed_again_and_passes_on_a_good_run():
    thresholds = {"cpu": {"noisy": {"min_ratio": 1.1}, "healthy": {"min_ratio": 1.1}}}
    asked = []

    def rerun(names):
        asked.append(names)
        return _cases({"noisy": 1.25})

    cases = gate.confirm_failures(_cases({"noisy": 1.05, "healthy": 1.3}), thresholds, rerun)
    assert asked == [["noisy"]]  # once: it passed; the healthy case is never rerun
    assert cases["noisy"].ratio == 1.25 and cases["noisy"].attempts == [1.05, 1.25]
    assert cases["healthy"].attempts == [1.3]
    verdicts = {v.case: v for v in gate.judge_cpu(cases, thresholds)}
    assert verdicts["noisy"].ok and "best of 2 runs of the case: 1.050, 1.250" in (
        verdicts["noisy"].message
    )


def test_cpu_regression_fails_after_every_rerun_with_its_best_figure():
    thresholds = {"cpu": {"slow": {"min_ratio": 1.1}}}
    again = iter([0.99, 1.02])
    cases = gate.confirm_failures(
        _cases({"slow": 0.97}), thresholds, lambda names: _cases({"slow": next(again)}), 2
    )
    assert cases["slow"].attempts == [0.97, 0.99, 1.02] and cases["slow"].ratio == 1.02
    (verdict,) = gate.judge_cpu(cases, thresholds)
    assert not verdict.ok and "REGRESSION" in verdict.message
    text = gate.cpu_markdown(cases, [verdict], thresholds, None, None)
    assert "**REGRESSION** (runs: 0.970, 0.990, 1.020)" in text
    # no reruns asked for: the first figure decides; a rerun that lost the case keeps it
    assert gate.confirm_failures(_cases({"slow": 0.97}), thresholds, None, 0)["slow"].ratio == 0.97
    kept = gate.confirm_failures(_cases({"slow": 0.97}), thresholds, lambda names: {}, 2)
    assert kept["slow"].attempts == [0.97]


def test_cpu_cli_reruns_a_failed_case_alone(tmp_path, monkeypatch):
    thresholds = tmp_path / "t.json"
    limits = {"a": {"min_ratio": 1.5, "measured": [2.0]}, "b": {"min_ratio": 1.5}}
    thresholds.write_text(json.dumps({"cpu": limits}))
    first = _bench_json({"a": [(1.2e-3, 1e-3)], "b": [(2e-3, 1e-3)]})

    def run_cpu_bench(json_path, only=None):
        assert only is None  # the full run
        json_path.write_text(json.dumps(first))
        return 0, 1.0

    reruns = []
    monkeypatch.setattr(gate, "BENCH_JSON", tmp_path / "gate.json")
    monkeypatch.setattr(gate, "run_cpu_bench", run_cpu_bench)
    monkeypatch.setattr(gate, "rerun_cases", lambda n: reruns.append(n) or _cases({"a": 1.8}))
    args = ["cpu", "--thresholds", str(thresholds), "--out-dir", str(tmp_path)]
    assert gate.main(args) == 0 and reruns == [["a"]]
    report = json.loads((tmp_path / "ci-latest.json").read_text())
    assert report["cases"]["a"]["attempts"] == [1.2, 1.8]
    assert "ok (runs: 1.200, 1.800)" in (tmp_path / "ci-latest.md").read_text()
    reruns.clear()
    assert gate.main([*args, "--confirm", "0"]) == 1 and reruns == []
    with pytest.raises(SystemExit):
        gate.main([*args, "--confirm", "-1"])


def test_bench_runs_only_the_cases_named_in_the_environment(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench module adds benchmarks/
    monkeypatch.setitem(sys.modules, "bench_ci_gate", None)
    bench = _load("bench_ci_gate")
    name = sorted(bench.CASES)[0]
    monkeypatch.setenv(gate.CASES_ENV, f"{name}\n")
    params = list(bench._params())
    assert {p.values[0] for p in params} == {name}
    assert len(params) == bench.CHUNKS * len(bench.ROLES)
    monkeypatch.setenv(gate.CASES_ENV, "no such case")
    with pytest.raises(ValueError, match="ATE_FAST_GATE_CASES: unknown case"):
        list(bench._params())
    monkeypatch.delenv(gate.CASES_ENV)
    assert len(list(bench._params())) == len(bench.CASES) * bench.CHUNKS * len(bench.ROLES)
