"""Turn pytest-benchmark JSON files into Markdown tables: median per call and the ratio
to the ``eager`` baseline of the same group (measured in the same run).

    python benchmarks/report.py results.json [more.json ...] > table.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def rows(paths: list[str]) -> dict[str, dict[str, float]]:
    """group -> impl -> median seconds per call."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:  # a suite stopped by its time limit
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        for bench in data["benchmarks"]:
            extra = bench.get("extra_info", {})
            impl = extra.get("impl", bench["name"])
            calls = extra.get("calls", 1)
            table[bench["group"] or bench["name"]][impl] = bench["stats"]["median"] / calls
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    impls: list[str] = []
    for per_impl in table.values():
        impls += [i for i in per_impl if i not in impls]
    others = [i for i in impls if i != "eager"]
    header = "| problem | eager µs | " + " | ".join(f"{i} µs (×eager)" for i in others) + " |"
    lines = [header, "|" + "---|" * (2 + len(others))]
    for group, per_impl in table.items():
        base = per_impl.get("eager")
        cells = []
        for impl in others:
            t = per_impl.get(impl)
            if t is None:
                cells.append("–")
            elif base:
                cells.append(f"{t * 1e6:.1f} ({base / t:.2f}×)")
            else:
                cells.append(f"{t * 1e6:.1f}")
        base_cell = f"{base * 1e6:.1f}" if base else "–"
        lines.append(f"| {group} | {base_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(markdown(rows(sys.argv[1:])))
