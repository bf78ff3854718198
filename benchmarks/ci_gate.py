"""Latency gate: judge benchmark ratios against ``ci_thresholds.json``; exit 1 on a regression.

    python benchmarks/ci_gate.py cpu                      # run bench_ci_gate.py, then judge
    python benchmarks/ci_gate.py cpu --json gate.json     # judge a pytest-benchmark JSON
    python benchmarks/ci_gate.py gpu NEW.json [--baseline OLD.json ...]
    python benchmarks/ci_gate.py spread RUN1.json RUN2.json ...   # ratios per case, to set
                                                                   # ci_thresholds.json

``cpu``: every case of ``bench_ci_gate.py`` has a ``baseline`` and a ``candidate`` row
timed in the same run, in alternating chunks; its figure is the median over the chunks of
the baseline's fastest round divided by the candidate's (min-of-N), and it fails below the
case's ``min_ratio``. A case below its threshold is timed again, alone, up to ``--confirm``
times (default 2): it fails only when every attempt is below (a regression is the code,
so it repeats; a burst of load on a shared machine does not), and its figure is its best
attempt, every attempt listed. A case with results
but no threshold, or a threshold whose case did not run, fails too. Writes
``ci-latest.json`` and ``ci-latest.md`` into ``--out-dir`` (``benchmarks/results``), with
the change against the ratios recorded in the thresholds file and against the previous
``ci-latest.json`` there, if any.

``gpu``: a GPU-suite results file (``gpu_summary.py``'s ``<date>-<gpu>.json``) against the
committed results for the same GPU in ``--results-dir`` (or the ``--baseline`` files).
Per (problem, row), the figure is the row's speedup over the problem's ``eager`` row in
the same run; a row fails when its speedup fell by more than the ``gpu`` section's
``max_slowdown`` factor (``max_slowdown_launch_bound`` for rows that took under
``launch_bound_s`` per call in the committed run). Where several committed files hold a
row, the newest one counts (ordered by their ``date``, then by the time git committed
them, then by name).

Only the standard library: the comparison is unit-tested without torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THRESHOLDS = HERE / "ci_thresholds.json"
RESULTS = HERE / "results"
BENCH_FILE = HERE / "bench_ci_gate.py"
BENCH_JSON = ROOT / ".benchmarks" / "ci-gate.json"  # .benchmarks/ is git-ignored
CASES_ENV = "ATE_FAST_GATE_CASES"  # bench_ci_gate.py runs only these cases (one per line)
CONFIRM = 2  # reruns of a case below its threshold before it fails the gate


# ----------------------------------------------------------------------------- cpu
@dataclass
class CpuCase:
    """One gate case: its figure, and the fastest round of each row over every chunk."""

    case: str
    baseline: str  # impl names, e.g. "ref" / "default"
    candidate: str
    ratio: float  # median over chunks of baseline min / candidate min: > 1, candidate faster
    chunk_ratios: list[float]
    baseline_min_s: float
    candidate_min_s: float
    rounds: int  # per role, every chunk together
    attempts: list[float] = field(default_factory=list)  # the ratio of every run, first first


@dataclass
class Verdict:
    """A judged figure: ``ok`` False fails the gate; ``message`` says why in one line."""

    case: str
    ok: bool
    message: str
    ratio: Optional[float] = None
    limit: Optional[float] = None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def cpu_cases(bench: dict) -> dict[str, CpuCase]:
    """Gate cases from a pytest-benchmark JSON of ``bench_ci_gate.py``: per chunk, the
    baseline's fastest round over the candidate's; the case's ratio is their median."""
    rows: dict[str, dict[int, dict[str, dict]]] = {}
    for entry in bench.get("benchmarks", []):
        extra = entry.get("extra_info", {})
        if "case" not in extra or extra.get("role") not in ("baseline", "candidate"):
            continue
        chunks = rows.setdefault(extra["case"], {})
        chunks.setdefault(extra.get("chunk", 0), {})[extra["role"]] = entry
    cases = {}
    for name, chunks in rows.items():
        pairs = [c for _, c in sorted(chunks.items()) if set(c) == {"baseline", "candidate"}]
        if not pairs:
            continue  # judged as missing: no chunk ran both roles
        base = [p["baseline"]["stats"]["min"] for p in pairs]
        cand = [p["candidate"]["stats"]["min"] for p in pairs]
        ratios = [b / c for b, c in zip(base, cand)]
        ratio = _median(ratios)
        cases[name] = CpuCase(
            case=name,
            baseline=pairs[0]["baseline"]["extra_info"].get("impl", "baseline"),
            candidate=pairs[0]["candidate"]["extra_info"].get("impl", "candidate"),
            ratio=ratio,
            chunk_ratios=ratios,
            baseline_min_s=min(base),
            candidate_min_s=min(cand),
            rounds=sum(p["candidate"]["stats"]["rounds"] for p in pairs),
            attempts=[ratio],
        )
    return cases


def below_threshold(cases: dict[str, CpuCase], thresholds: dict) -> list[str]:
    """The cases that ran and whose figure is under their ``min_ratio``."""
    limits = thresholds["cpu"]
    return [
        name
        for name, case in cases.items()
        if "min_ratio" in limits.get(name, {}) and case.ratio < limits[name]["min_ratio"]
    ]


def confirm_failures(
    cases: dict[str, CpuCase],
    thresholds: dict,
    rerun: Callable[[list[str]], dict[str, CpuCase]],
    attempts: int = CONFIRM,
) -> dict[str, CpuCase]:
    """Time each case below its threshold again, alone (``rerun(names)`` returns their new
    figures), up to ``attempts`` times or until it is at or above. A case keeps its best
    attempt as its figure, and ``attempts`` lists them all; ``cases`` is not changed."""
    cases = dict(cases)
    for _ in range(attempts):
        names = below_threshold(cases, thresholds)
        if not names:
            break
        again = rerun(names)
        for name in names:
            old, new = cases[name], again.get(name)
            if new is None:  # the rerun lost it: the first figure stands
                continue
            best = new if new.ratio > old.ratio else old
            cases[name] = CpuCase(**{**asdict(best), "attempts": [*old.attempts, new.ratio]})
    return cases


def judge_cpu(cases: dict[str, CpuCase], thresholds: dict) -> list[Verdict]:
    """One verdict per case in either the results or the thresholds' ``cpu`` section."""
    limits = thresholds["cpu"]
    verdicts = []
    for name in list(limits) + [c for c in cases if c not in limits]:
        case, limit = cases.get(name), limits.get(name, {}).get("min_ratio")
        if case is None:
            verdicts.append(Verdict(name, False, f"{name}: no result (the case did not run)"))
        elif limit is None:
            msg = f"{name}: {case.ratio:.3f}, but ci_thresholds.json has no min_ratio for it"
            verdicts.append(Verdict(name, False, msg, case.ratio))
        else:
            ok = case.ratio >= limit
            msg = (
                f"{name}: {case.candidate} is {case.ratio:.3f}× {case.baseline}'s speed "
                f"(median chunk of min-of-N; threshold ≥ {limit}): {'ok' if ok else 'REGRESSION'}"
            )
            if len(case.attempts) > 1:
                tried = ", ".join(f"{r:.3f}" for r in case.attempts)
                msg += f" (best of {len(case.attempts)} runs of the case: {tried})"
            verdicts.append(Verdict(name, ok, msg, case.ratio, limit))
    return verdicts


def _reference_ratio(entry: dict) -> Optional[float]:
    """The median of the ratios recorded when the threshold was set: ``measured``, or
    for a case measured on one other machine only its ``measured_<machine>`` runs."""
    runs = entry.get("measured") or next(
        (v for k, v in entry.items() if k.startswith("measured_") and v), None
    )
    return _median(runs) if runs else None


def cpu_markdown(
    cases: dict[str, CpuCase],
    verdicts: list[Verdict],
    thresholds: dict,
    previous: Optional[dict],
    wall_s: Optional[float],
    bench_error: Optional[str] = None,
) -> str:
    """The gate's summary: a line per case, the change against the recorded and previous
    ratios, the failures."""
    failed = [v for v in verdicts if not v.ok]
    head = "FAILED" if failed or bench_error else "passed"
    lines = [f"# CPU latency gate: {head}", ""]
    if bench_error:
        lines += [f"**{bench_error}**", ""]
    if wall_s is not None:
        lines += [f"Benchmark wall time {wall_s:.0f} s.", ""]
    lines += [
        "Ratio = baseline time / candidate time: per chunk the fastest round of each, median "
        "over the chunks (> 1: the candidate is faster); times are the fastest rounds over "
        "every chunk; `recorded` is the median ratio measured when the threshold was set. A "
        "case below its threshold is timed again, alone, before it fails: its figure is then "
        "its best run, and the last column lists every run.",
        "",
        "| case | baseline µs | candidate µs | ratio | threshold | recorded | previous run | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    before = (previous or {}).get("cases", {})
    for v in verdicts:
        case = cases.get(v.case)
        entry = thresholds["cpu"].get(v.case, {})
        if case is None:
            lines.append(f"| {v.case} | – | – | – | {entry.get('min_ratio', '–')} | | | missing |")
            continue
        ref, prev = _reference_ratio(entry), before.get(v.case, {}).get("ratio")
        lines.append(
            f"| {v.case} | {case.baseline} {case.baseline_min_s * 1e6:.1f} "
            f"| {case.candidate} {case.candidate_min_s * 1e6:.1f} | **{case.ratio:.3f}** "
            f"| ≥ {entry.get('min_ratio', '–')} | {_change(case.ratio, ref)} "
            f"| {_change(case.ratio, prev)} | {'ok' if v.ok else '**REGRESSION**'}"
            f"{_reruns(case)} |"
        )
    if failed:
        lines += ["", "Failures:", ""] + [f"- {v.message}" for v in failed]
    return "\n".join(lines) + "\n"


def _reruns(case: CpuCase) -> str:
    if len(case.attempts) < 2:
        return ""
    return " (runs: " + ", ".join(f"{r:.3f}" for r in case.attempts) + ")"


def _change(now: float, then: Optional[float]) -> str:
    if not then:
        return "–"
    return f"{then:.3f} ({(now / then - 1) * 100:+.0f} %)"


def run_cpu_bench(json_path: Path, only: Optional[list[str]] = None) -> tuple[int, float]:
    """Run ``bench_ci_gate.py`` under pytest-benchmark into ``json_path``, every case or
    ``only`` these: (exit code, s)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)  # never judge an earlier run's file
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH_FILE), "-q", "-p", "no:cacheprovider",
        f"--benchmark-json={json_path}",
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop(CASES_ENV, None)
    if only is not None:
        env[CASES_ENV] = "\n".join(only)
        print(f"+ {CASES_ENV}={';'.join(only)}", flush=True)
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    return rc, time.perf_counter() - t0


def rerun_cases(names: list[str]) -> dict[str, CpuCase]:
    """Time ``names`` again in a fresh benchmark run; their figures (none if it failed)."""
    path = BENCH_JSON.with_name("ci-gate-rerun.json")
    rc, _ = run_cpu_bench(path, only=names)
    if rc != 0 or not path.exists():
        print(f"ci_gate: the rerun of {names} failed (pytest exit {rc})", file=sys.stderr)
        return {}
    return cpu_cases(load_json(path))


def cpu_main(args: argparse.Namespace) -> int:
    thresholds = load_json(args.thresholds)
    wall_s, bench_error = None, None
    if args.json is None:
        rc, wall_s = run_cpu_bench(BENCH_JSON)
        if rc != 0:  # judge what did run (pytest-benchmark still writes it), then fail
            bench_error = f"The benchmark run failed (pytest exit {rc}); see its output."
        bench_path = BENCH_JSON
    else:
        bench_path = Path(args.json)
    if not bench_path.exists():
        message = f"ci_gate: {bench_path} was not written; {bench_error or ''}"
        print(message, file=sys.stderr)
        # an earlier run's ci-latest.md would read as this run's result (the .json stays:
        # the next run's "previous run" column)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "ci-latest.md").write_text(f"# CPU latency gate: FAILED\n\n{message}\n")
        return 1
    bench = load_json(bench_path)
    cases = cpu_cases(bench)
    if args.json is None and bench_error is None:
        cases = confirm_failures(cases, thresholds, rerun_cases, args.confirm)
    verdicts = judge_cpu(cases, thresholds)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_path = out_dir / "ci-latest.json"
    previous = load_json(previous_path) if previous_path.exists() else None
    passed = all(v.ok for v in verdicts) and bench_error is None
    machine = bench.get("machine_info", {})
    torch_version = next(
        (
            e["extra_info"]["torch"]
            for e in bench.get("benchmarks", [])
            if "torch" in e.get("extra_info", {})
        ),
        None,
    )
    report = {
        "kind": "ate_fast CPU latency gate",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "passed": passed,
        "bench_error": bench_error,
        "bench_wall_s": wall_s,
        "bench_json": str(bench_path),
        "commit": bench.get("commit_info", {}).get("id"),
        "machine": {
            "cpu": machine.get("cpu", {}).get("brand_raw") or platform.processor(),
            "cores": machine.get("cpu", {}).get("count"),
            "python": machine.get("python_version"),
            "torch": torch_version,
        },
        "cases": {name: asdict(case) for name, case in cases.items()},
        "verdicts": [asdict(v) for v in verdicts],
    }
    (out_dir / "ci-latest.json").write_text(json.dumps(report, indent=2) + "\n")
    text = cpu_markdown(cases, verdicts, thresholds, previous, wall_s, bench_error)
    (out_dir / "ci-latest.md").write_text(text)
    print(text)
    return 0 if passed else 1


def spread_main(args: argparse.Namespace) -> int:
    """Print each case's ratio in every given run and the case's threshold: what the
    thresholds' ``measured`` lists hold."""
    limits = load_json(args.thresholds)["cpu"]
    ratios: dict[str, list[float]] = {}
    for path in args.runs:
        for name, case in cpu_cases(load_json(path)).items():
            ratios.setdefault(name, []).append(round(case.ratio, 3))
    for name, values in ratios.items():
        limit = limits.get(name, {}).get("min_ratio", "–")
        print(f"{name}: min {min(values)}, max {max(values)}, threshold {limit}: {values}")
    return 0


# ----------------------------------------------------------------------------- gpu
TABLE = "benchmarks_median_seconds_per_call"


@dataclass
class GpuRow:
    """One (problem, row) of a GPU comparison; speedups are over the problem's baseline
    row (``eager``) of the same run."""

    problem: str
    row: str
    new_speedup: float
    old_speedup: float
    change: float  # new_speedup / old_speedup: < 1 means the row lost ground
    old_s: float  # the row's time per call in the committed run (decides its limit)
    limit: float  # the largest accepted slowdown, 1 / change
    old_file: str
    ok: bool


def speedups(table: dict[str, dict[str, float]], baseline_row: str) -> dict[tuple, tuple]:
    """(problem, row) -> (baseline time / row time, row time), for problems that have the
    baseline row."""
    out = {}
    for problem, per_row in table.items():
        base = per_row.get(baseline_row)
        if not base:
            continue
        for row, t in per_row.items():
            if row != baseline_row and t and math.isfinite(t):
                out[(problem, row)] = (base / t, t)
    return out


def _git_commit_time(path: Path) -> Optional[int]:
    """When git last committed ``path`` (None: not committed, or no git here)."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%ct", "--", path.name],
            cwd=path.parent, capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out) if out else None


def _in_git_work_tree(directory: Path) -> bool:
    try:
        subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree"],
            cwd=directory, capture_output=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def committed_results(results_dir: Path, gpu: str, exclude: Path) -> list[Path]:
    """Results files for ``gpu`` in ``results_dir``, oldest first: ordered by their
    ``date``, then by git commit time, then by name. Under git, files git has not
    committed are left out (they are not "the last committed results")."""
    under_git = _in_git_work_tree(results_dir)
    found = []
    for path in sorted(results_dir.glob("*.json")):
        if path.resolve() == exclude.resolve():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("gpu") != gpu or TABLE not in data:
            continue
        committed = _git_commit_time(path) if under_git else None
        if under_git and committed is None:
            continue
        found.append(((data.get("date", ""), committed or 0, path.name), path))
    return [path for _, path in sorted(found)]


def merged_speedups(files: list[tuple[str, dict]], baseline_row: str) -> dict[tuple, tuple]:
    """(problem, row) -> (speedup, row time, file name), later files overriding earlier."""
    merged = {}
    for name, data in files:
        for key, (speedup, t) in speedups(data[TABLE], baseline_row).items():
            merged[key] = (speedup, t, name)
    return merged


def slowdown_limit(old_s: float, settings: dict) -> float:
    """The largest accepted slowdown of a row's speedup: ``max_slowdown``, or the looser
    ``max_slowdown_launch_bound`` for rows under ``launch_bound_s`` per call in the
    committed run (launch latency, i.e. the host, sets those)."""
    if old_s < settings["launch_bound_s"]:
        return settings["max_slowdown_launch_bound"]
    return settings["max_slowdown"]


def compare_gpu(new: dict, old_files: list[tuple[str, dict]], settings: dict) -> dict:
    """Compare a new GPU results dict with committed ones (``(name, dict)``, oldest
    first). Returns ``rows`` (every compared row, worst change first), ``failures`` (their
    one-line messages), ``new_only`` / ``old_only`` (rows present on one side), ``ok``."""
    baseline_row = settings["baseline_row"]
    now = speedups(new[TABLE], baseline_row)
    before = merged_speedups(old_files, baseline_row)
    rows = []
    for key in sorted(now.keys() & before.keys()):
        (old, old_s, old_file), value = before[key], now[key][0]
        change, limit = value / old, slowdown_limit(old_s, settings)
        rows.append(
            GpuRow(key[0], key[1], value, old, change, old_s, limit, old_file, change * limit >= 1)
        )
    rows.sort(key=lambda r: r.change)
    failures = [
        f"{r.problem} / {r.row}: {r.new_speedup:.2f}× {baseline_row}, was {r.old_speedup:.2f}× "
        f"({r.old_file}): {1 / r.change:.2f}× slower relative to {baseline_row} "
        f"(limit {r.limit}×)"
        for r in rows
        if not r.ok
    ]
    return {
        "baseline_row": baseline_row,
        "settings": {k: v for k, v in settings.items() if k != "reason"},
        "rows": rows,
        "failures": failures,
        "new_only": sorted(now.keys() - before.keys()),
        "old_only": sorted(before.keys() - now.keys()),
        "ok": not failures,
    }


def gpu_markdown(result: dict, new_name: str, old_names: list[str]) -> str:
    """The comparison as Markdown: failures, then every compared row, worst first."""
    rows, base, cfg = result["rows"], result["baseline_row"], result["settings"]
    verdict = "FAILED" if result["failures"] else "passed"
    lines = [
        f"## GPU results vs the last committed ones: {verdict}",
        "",
        f"{new_name} against {', '.join(old_names) or '(none)'} (per row the newest); speedup "
        f"= {base} time / row time in the same run; a row fails when its speedup fell more "
        f"than {cfg['max_slowdown']}× ({cfg['max_slowdown_launch_bound']}× for rows under "
        f"{cfg['launch_bound_s'] * 1e6:.0f} µs per call, launch-bound). {len(rows)} rows "
        f"compared, {len(result['new_only'])} new, {len(result['old_only'])} not in this run.",
        "",
    ]
    if result["failures"]:
        lines += ["Regressions:", ""] + [f"- {f}" for f in result["failures"]] + [""]
    if rows:
        lines += [
            "| problem | row | µs before | speedup now | before | change | limit | |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r.problem} | {r.row} | {r.old_s * 1e6:.1f} | {r.new_speedup:.2f}× "
                f"| {r.old_speedup:.2f}× | {(r.change - 1) * 100:+.0f} % | ÷{r.limit} "
                f"| {'ok' if r.ok else '**REGRESSION**'} |"
            )
    return "\n".join(lines) + "\n"


def gpu_main(args: argparse.Namespace) -> int:
    settings = load_json(args.thresholds)["gpu"]
    new_path = Path(args.new)
    new = load_json(new_path)
    if args.baseline:
        old_paths = [Path(p) for p in args.baseline]
    else:
        old_paths = committed_results(Path(args.results_dir), new.get("gpu"), new_path)
    if old_paths:
        result = compare_gpu(new, [(p.name, load_json(p)) for p in old_paths], settings)
        text = gpu_markdown(result, new_path.name, [p.name for p in old_paths])
        ok = result["ok"]
    else:
        text = (
            f"## GPU results vs the last committed ones: nothing to compare\n\n"
            f"No committed results for {new.get('gpu')!r} in {args.results_dir}.\n"
        )
        ok = True
    if args.out_md:
        Path(args.out_md).write_text(text)
    print(text)
    return 0 if ok else 1


# ----------------------------------------------------------------------------- cli
def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--thresholds", default=str(THRESHOLDS), help="ci_thresholds.json")
    sub = parser.add_subparsers(dest="mode", required=True)
    cpu = sub.add_parser("cpu", parents=[common], help="run and judge the CPU gate")
    cpu.add_argument("--json", help="judge this pytest-benchmark JSON instead of running")
    cpu.add_argument("--out-dir", default=str(RESULTS), help="where ci-latest.json/.md go")
    cpu.add_argument(
        "--confirm", type=int, default=CONFIRM,
        help="reruns of a case below its threshold before it fails (0: none; not with --json)",
    )  # fmt: skip
    gpu = sub.add_parser(
        "gpu", parents=[common], help="compare GPU-suite results with the committed ones"
    )
    gpu.add_argument("new", help="the new <date>-<gpu>.json (gpu_summary.py)")
    gpu.add_argument("--baseline", nargs="+", help="committed files to compare with, oldest first")
    gpu.add_argument("--results-dir", default=str(RESULTS))
    gpu.add_argument("--out-md", help="also write the Markdown here")
    spread = sub.add_parser("spread", parents=[common], help="ratios per case over runs")
    spread.add_argument("runs", nargs="+", help="pytest-benchmark JSONs of bench_ci_gate.py")
    args = parser.parse_args(argv)
    if args.mode == "cpu" and args.confirm < 0:
        parser.error(f"--confirm: expected a number of reruns ≥ 0, got {args.confirm}")
    return {"cpu": cpu_main, "gpu": gpu_main, "spread": spread_main}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
