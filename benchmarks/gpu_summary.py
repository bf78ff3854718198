"""Combine one GPU-suite run into ``<date>-<gpu>.json`` (+ a Markdown summary).

    python benchmarks/gpu_summary.py OUT_DIR

Reads OUT_DIR/info.json (ate-fast info --json), OUT_DIR/cuda_tests*.xml (pytest junit,
one per shard),
OUT_DIR/bench*.json (pytest-benchmark; where one is missing or unreadable, its
``.partial`` twin, the cases finished before the suite was killed: benchmarks/conftest.py),
OUT_DIR/profile_capture.json, OUT_DIR/realsize.json
and realsize.md (bench_realsize.py's report) and OUT_DIR/not_run.txt (what the suite's time
budget left out) if present; writes OUT_DIR/<date>-<gpu>.json and OUT_DIR/summary.md, and
prints the summary. ``bench_heads.json`` gets its own table (per case: median per row,
× eager and × compile) and the issue's targets, as explicit ratios; the real-size rows come
first, as bench_realsize.py reported them (floor fractions, targets).
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown, rows

from ate_fast.align.atomic_io import atomic_write_text  # whole or not at all


def test_counts(junits: list[Path], planned: bool = False) -> dict:
    """Test counts summed over the readable JUnit files (one per shard), the failed tests'
    ids, and the shards whose file could not be read (their tests are not counted);
    ``planned``: the suite ran no tests on purpose (``ATE_FAST_TESTS=none``)."""
    if not junits:
        return {"not_run": TESTS_NONE} if planned else {"error": "no cuda_tests*.xml"}
    suites, unreadable = [], []
    for junit in junits:
        try:
            root = ET.parse(junit).getroot()
        except (OSError, ET.ParseError) as exc:  # a shard killed before it wrote the file
            unreadable.append(f"{junit.name}: {exc}")
            continue
        suites += [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed
    if unreadable:  # the totals are partial
        counts["unreadable"] = unreadable
    return counts


TESTS_NONE = "ATE_FAST_TESTS=none"  # gpu_suite.sh's not_run.txt line for a run without tests
HEADS_ROWS = (
    "eager", "compile", "cuda_graph", "ate_sample", "ate_capture", "ate_capture_compiled",
    "ate_capture_triton",
)  # fmt: skip
# the rows the targets are stated for (ate_capture_triton: transformer-guided only)
ATE_ROWS = ("ate_capture", "ate_capture_compiled", "ate_capture_triton")
# the unguided row a guided row's overhead is measured against (the triton row differs from
# ate_capture only in the guidance, so it has no unguided run of its own)
UNGUIDED_ROW = {"ate_capture_triton": "ate_capture"}
# The targets (GPU): guided ate_capture vs compile / eager on this head, and the
# cost of guidance over unguided captured sampling per encoder.
TARGET_HEAD = "flow-transformer-small"
VS_COMPILE, VS_EAGER = 1.3, 4.0
GUIDANCE_OVERHEAD = {"mlp-guided": 0.10, "transformer-guided": 0.25}


def heads_cases(path: Path) -> dict[tuple, dict[str, float]]:
    """(device, head, sampler, guidance) -> row -> median seconds per call."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, or the suite was killed mid-write
        print(f"skipping {path}: {exc}", file=sys.stderr)
        return {}
    cases: dict[tuple, dict[str, float]] = {}
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        if extra.get("suite") != "heads":
            continue
        key = (extra["device"], extra["head"], extra["sampler"], extra["guidance"])
        median = bench["stats"]["median"] / extra.get("calls", 1)
        cases.setdefault(key, {})[extra["impl"]] = median
    return cases


def _cell(t: Optional[float], eager: Optional[float], compiled: Optional[float], row: str) -> str:
    if t is None:
        return "–"
    ratios = []
    if eager and row != "eager":
        ratios.append(f"{eager / t:.2f}× eager")
    if compiled and row not in ("eager", "compile"):
        ratios.append(f"{compiled / t:.2f}× compile")
    return f"{t * 1e6:.1f}" + (f" ({', '.join(ratios)})" if ratios else "")


def heads_markdown(cases: dict[tuple, dict[str, float]]) -> str:
    """One line per case: median µs per row; × > 1 means faster than eager / compile."""
    lines = [
        "| case | " + " | ".join(f"{r} µs" for r in HEADS_ROWS) + " |",
        "|" + "---|" * (1 + len(HEADS_ROWS)),
    ]
    for key, per_row in cases.items():
        eager, compiled = per_row.get("eager"), per_row.get("compile")
        cells = [_cell(per_row.get(r), eager, compiled, r) for r in HEADS_ROWS]
        lines.append(f"| {' '.join(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def heads_targets(cases: dict[tuple, dict[str, float]]) -> tuple[list[str], list[dict]]:
    """The issue's targets as explicit ratios for each captured row (``ATE_ROWS``):
    (Markdown lines, records for the JSON)."""
    lines, records = [], []
    for (device, head, sampler, guidance), per_row in cases.items():
        if head != TARGET_HEAD or guidance == "unguided":
            continue
        for ate_row in ATE_ROWS:
            ate = per_row.get(ate_row)
            for base, need in (("compile", VS_COMPILE), ("eager", VS_EAGER)):
                if ate is None or per_row.get(base) is None:
                    continue
                ratio = per_row[base] / ate
                records.append({
                    "target": f"{ate_row} >= {need}x faster than {base}", "device": device,
                    "head": head, "sampler": sampler, "guidance": guidance, "ratio": ratio,
                    "met": ratio >= need,
                })  # fmt: skip
                lines.append(
                    f"- {device} {head} {sampler} {guidance}: {ate_row} is {ratio:.2f}× "
                    f"faster than {base} (target ≥ {need}×: {_verdict(ratio >= need)})"
                )
    for (device, head, sampler, guidance), per_row in cases.items():
        limit = GUIDANCE_OVERHEAD.get(guidance)
        unguided = cases.get((device, head, sampler, "unguided"), {})
        for ate_row in ATE_ROWS:
            plain = unguided.get(UNGUIDED_ROW.get(ate_row, ate_row))
            guided = per_row.get(ate_row)
            if limit is None or plain is None or guided is None:
                continue
            overhead = guided / plain - 1.0
            records.append({
                "target": f"guidance overhead <= {limit:.0%}", "row": ate_row, "device": device,
                "head": head, "sampler": sampler, "guidance": guidance, "ratio": guided / plain,
                "met": overhead <= limit,
            })  # fmt: skip
            lines.append(
                f"- {device} {head} {sampler}: {guidance} {ate_row} / unguided = "
                f"{guided / plain:.3f} (+{overhead:.1%}; target ≤ +{limit:.0%}: "
                f"{_verdict(overhead <= limit)})"
            )
    return lines, records


def transformer_path_lines(table: dict[str, dict[str, float]]) -> list[str]:
    """Which Transformer-encoder guidance path wins inside a CUDA graph, per problem (the
    default of ``ate_fast.steer.transformer_vjp.DEFAULT_PATH["cuda"]`` follows this)."""
    lines = []
    names = {"eager_graph": "autograd", "vjp_graph": "vjp", "compiled_graph": "compiled",
             "triton_graph": "triton"}  # fmt: skip
    for group, per_impl in table.items():
        graphed = {name: per_impl[impl] for impl, name in names.items() if per_impl.get(impl)}
        if len(graphed) < 2:
            continue
        winner = min(graphed, key=graphed.get)
        ratios = ", ".join(
            f"{name} {graphed[name] / graphed[winner]:.2f}×" for name in graphed if name != winner
        )
        lines.append(f"- {group}: {winner} wins graphed (time vs it: {ratios})")
    return ["Transformer-encoder guidance, graphed paths:", "", *lines, ""] if lines else []


def _demoted(markdown_text: str) -> str:
    """Every Markdown heading of ``markdown_text`` one level down."""
    return "\n".join(
        "#" + line if line.startswith("#") else line for line in markdown_text.splitlines()
    )


def _optional_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _not_run(out_dir: Path) -> list[str]:
    """The suite steps gpu_suite.sh left out or cut (not_run.txt): its time budget, a failed
    CUDA build."""
    try:
        return [line for line in (out_dir / "not_run.txt").read_text().splitlines() if line]
    except OSError:
        return []


def adopt_partials(out_dir: Path) -> list[str]:
    """Each ``bench*.json.partial`` (benchmarks/conftest.py: the cases finished so far) in
    place of its ``bench*.json`` where pytest-benchmark wrote none (the suite was killed
    before its writer ran, or mid-write); one not_run line per adopted file. A partial beside
    a readable JSON is removed."""
    notes = []
    for partial in sorted(out_dir.glob("bench*.json.partial")):
        whole = partial.with_name(partial.name[: -len(".partial")])
        if _optional_json(whole) is not None:
            partial.unlink()
            continue
        cases = len((_optional_json(partial) or {}).get("benchmarks", []))
        partial.replace(whole)
        notes.append(
            f"{whole.stem}: killed before pytest-benchmark wrote its JSON; the {cases} cases it "
            "finished are kept (its .partial file)"
        )
    return notes


def _gpu_name(info: Optional[dict], realsize: Optional[dict]) -> str:
    """The GPU's name from ``ate-fast info`` (or, where that failed, bench_realsize's report)."""
    if info and info.get("gpus"):
        return info["gpus"][0]["name"]
    device = ((realsize or {}).get("environment") or {}).get("device")
    if device and device != "cuda":
        return device
    return "unknown-gpu" if info is None else "no-gpu"


def main(out_dir: Path) -> None:
    info = _optional_json(out_dir / "info.json")  # None: `ate-fast info` failed
    realsize = _optional_json(out_dir / "realsize.json")
    gpu = _gpu_name(info, realsize)
    not_run = _not_run(out_dir) + adopt_partials(out_dir)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    date = datetime.date.today().isoformat()
    bench_files = sorted(str(p) for p in out_dir.glob("bench*.json"))
    table = rows(bench_files) if bench_files else {}
    heads_file = out_dir / "bench_heads.json"
    own_sections = (heads_file.name, "bench_realsize.json")
    others = [f for f in bench_files if Path(f).name not in own_sections]
    general = {Path(f).stem: rows([f]) for f in others}
    heads = heads_cases(heads_file) if heads_file.exists() else {}
    target_lines, target_records = heads_targets(heads)
    result = {
        "date": date,
        "gpu": gpu,
        "info": info if info is not None else {"error": "info.json missing or unreadable"},
        "cuda_tests": test_counts(
            sorted(out_dir.glob("cuda_tests*.xml")), any(TESTS_NONE in line for line in not_run)
        ),
        "benchmarks_median_seconds_per_call": table,
        "heads_targets": target_records,
        "profile_capture": _optional_json(out_dir / "profile_capture.json"),
        "realsize": realsize,
        "not_run": not_run,
    }
    atomic_write_text(out_dir / f"{date}-{slug}.json", json.dumps(result, indent=2) + "\n")
    tests = result["cuda_tests"]
    summary = [f"# GPU suite {date} on {gpu}", "", f"cuda-marked tests: {json.dumps(tests)}", ""]
    realsize_md = out_dir / "realsize.md"
    if realsize_md.exists():  # its headings one level down here (its title is level 1)
        summary += [_demoted(realsize_md.read_text()), ""]
    for suite, suite_rows in general.items():
        summary += [f"## {suite}", "", markdown(suite_rows) if suite_rows else "(no results)", ""]
    if not general:
        summary.append("(no benchmark results)")
    summary += transformer_path_lines(general.get("bench_transformer_guidance", {}))
    if heads:
        summary += ["", "## Whole sampler per head (bench_heads)", "", heads_markdown(heads)]
        summary += ["", "Targets (set for the GPU; ratios from the table above):", ""]
        summary += target_lines or ["(no case with the rows the targets need)"]
    for case in (result["profile_capture"] or {}).get("cases", []):
        counts = ", ".join(f"{k} {v:.1f}" for k, v in case.items() if k.endswith("_per_call"))
        kind = case.get("guidance") or ("guided" if case["guided"] else "unguided")
        summary.append(f"- captured flow Euler 10, guidance {kind} (profile_capture.py): {counts}")
    if result["not_run"]:
        summary += ["", "Not run or cut (the suite's time budget, a failed CUDA build):", ""]
        summary += [f"- {line}" for line in result["not_run"]]
    text = "\n".join(summary) + "\n"
    atomic_write_text(out_dir / "summary.md", text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
