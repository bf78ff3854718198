"""Combine one GPU-suite run into ``<date>-<gpu>.json`` (+ a Markdown summary).

    python benchmarks/gpu_summary.py OUT_DIR

Reads OUT_DIR/info.json (ate-fast info --json), OUT_DIR/cuda_tests.xml (pytest junit)
and OUT_DIR/bench*.json (pytest-benchmark); writes OUT_DIR/<date>-<gpu>.json and
OUT_DIR/summary.md, and prints the summary.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import markdown, rows


def test_counts(junit: Path) -> dict:
    if not junit.exists():
        return {"error": f"{junit.name} missing"}
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
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
    return counts


def main(out_dir: Path) -> None:
    info = json.loads((out_dir / "info.json").read_text())
    gpu = info["gpus"][0]["name"] if info.get("gpus") else "no-gpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    date = datetime.date.today().isoformat()
    bench_files = sorted(str(p) for p in out_dir.glob("bench*.json"))
    table = rows(bench_files) if bench_files else {}
    result = {
        "date": date,
        "gpu": gpu,
        "info": info,
        "cuda_tests": test_counts(out_dir / "cuda_tests.xml"),
        "benchmarks_median_seconds_per_call": table,
    }
    (out_dir / f"{date}-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    tests = result["cuda_tests"]
    summary = [f"# GPU suite {date} on {gpu}", "", f"cuda-marked tests: {json.dumps(tests)}", ""]
    summary.append(markdown(table) if table else "(no benchmark results)")
    text = "\n".join(summary) + "\n"
    (out_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
