"""``ate-fast eval rtc``'s tables and plot: success (the benchmark's cell and paired
statistics, read from ``summary.json``), action jumps at chunk switches, latency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ate_fast.eval.metaworld.realtime import RTC_METHODS


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _signed(x: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    return "—" if x is None else f"{scale * x:+.{digits}f}"


def _num(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3f}"


def _interval(ci: list, scale: float = 100.0, digits: int = 1, signed: bool = True) -> str:
    if ci[0] is None:
        return ""
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f" [{fmt.format(scale * ci[0])}, {fmt.format(scale * ci[1])}]"


def _success_rows(summary: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in summary["cells"]:
        rows.setdefault((cell["shift"], cell["method"]), {})["cell"] = cell
    for diff in summary["differences"]:
        rows.setdefault((diff["shift"], diff["method"]), {})["diff"] = diff
    return rows


def _group_table(group: str, rows: dict, jumps: dict) -> list[str]:
    lines = [
        f"### {group}",
        "",
        "| method | success % [95 % CI] | Δ vs naive (points) | jump at switch "
        "[95 % CI] | jump elsewhere | Δ jump at switch vs naive |",
        "|---|---|---|---|---|---|",
    ]
    for method in RTC_METHODS:
        row, jump = rows.get((group, method)), jumps.get((group, method))
        if row is None or jump is None:
            continue
        cell, diff = row["cell"], row.get("diff")
        success = f"{_pct(cell['mean'])}{_interval(cell['ci'], signed=False)}"
        delta = "—" if diff is None else f"{_signed(diff['mean'])}{_interval(diff['ci'])}"
        if diff is not None and diff["significant"]:
            delta = f"**{delta}**"
        sw, other = jump["switch"], jump["other"]
        vs = jump.get("switch_vs_naive")
        jump_at = f"{_num(sw['mean'])}{_interval(sw['ci'], 1, 3, False)}"
        jump_vs = "—" if vs is None else f"{_signed(vs['mean'], 1, 3)}{_interval(vs['ci'], 1, 3)}"
        lines.append(
            f"| {method} | {success} | {delta} | {jump_at} | {_num(other['mean'])} | {jump_vs} |"
        )
    return [*lines, ""]


def _latency_table(out: Path) -> list[str]:
    path = out / "latency.json"
    if not path.exists():
        return []
    numbers = json.loads(path.read_text())
    batches = [k for k in numbers if k.startswith("batch ")]
    lines = [
        f"## Sampler latency per chunk (delay {numbers['delay']}, one CPU thread, "
        "median [90th percentile] ms of interleaved calls)",
        "",
        "| variant | " + " | ".join(batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for variant in numbers[batches[0]]:
        cells = [
            f"{numbers[b][variant]['median_ms']:.2f} [{numbers[b][variant]['p90_ms']:.2f}]"
            for b in batches
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def realtime_markdown(
    out: Path, jumps: list[dict[str, Any]], steer: list[dict], title: str = "Meta-World"
) -> str:
    """``realtime.md``: per delay, every method's success, jumps and latency; then
    RTC with the Steer-fine-tuned policy against RTC with the direct one."""
    summary = json.loads((out / "summary.json").read_text())
    rows = _success_rows(summary)
    by_key = {(j["group"], j["method"]): j for j in jumps}
    groups = sorted(
        {j["group"] for j in jumps}, key=lambda g: (g.split("/")[0], int(g.rsplit("=", 1)[1]))
    )
    lines = [
        f"# Real-time chunking on {title}",
        "",
        "Success: mean over seeds of the per-task rates, 95 % hierarchical bootstrap "
        "intervals (seeds, then episodes), paired Δ vs `naive` (same layouts and noise); "
        "bold: the interval excludes 0. Jump: ‖a_k − a_{k−1}‖₂ over the robot's action "
        "slots, mean per episode at chunk switches (k = n·s + d) and at the other steps; "
        "Δ paired episode by episode. Latency: measured apart, interleaved, on one "
        "thread (the table after the delays; each run's JSON also holds the time per chunk "
        "inside the run, on a shared machine: not comparable between runs).",
        "",
    ]
    for group in groups:
        lines += _group_table(group, rows, by_key)
    lines += _latency_table(out)
    if not steer:
        return "\n".join(lines)
    lines += [
        "## RTC with the Steer.recommended policy vs RTC with the direct policy",
        "",
        "| group | rtc+steer % | rtc % | Δ (points) [95 % CI] |",
        "|---|---|---|---|",
    ]
    for d in steer:
        delta = f"{_signed(d['mean'])}{_interval(d['ci'])}"
        delta = f"**{delta}**" if d["significant"] else delta
        lines.append(
            f"| {d['shift']} | {_pct(d['method_mean'])} | {_pct(d['baseline_mean'])} | {delta} |"
        )
    return "\n".join(lines) + "\n"


def _shift_and_delay(label: str) -> tuple[str, int]:
    """``("linear", 2)`` from a cell's or jump group's label ``"linear/d=2"``."""
    head, delay = label.rsplit("=", 1)
    return head.rsplit("/", 1)[0], int(delay)


def plot_realtime(out: Path, jumps: list[dict[str, Any]], path: Path) -> Path:
    """Two panels against the delay d: success (from ``summary.json``) and the action jump
    at chunk switches, one line per method (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = json.loads((out / "summary.json").read_text())
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_s, ax_j = fig.subplots(1, 2)
    # (shift, delay, cell) once; one line per (shift, method), sorted by the delay alone
    # (cells are never compared)
    parsed = [(*_shift_and_delay(c["shift"]), c) for c in summary["cells"]]
    shifts = sorted({shift for shift, _, _ in parsed})
    for shift in shifts:
        for method in RTC_METHODS:
            label = method if len(shifts) == 1 else f"{method} ({shift})"
            cells = sorted(
                ((d, c) for s, d, c in parsed if s == shift and c["method"] == method),
                key=lambda dc: dc[0],
            )
            if cells:
                ax_s.errorbar(
                    [d for d, _ in cells], [100 * c["mean"] for _, c in cells],
                    yerr=[[100 * (c["mean"] - c["ci"][0]) for _, c in cells],
                          [100 * (c["ci"][1] - c["mean"]) for _, c in cells]],
                    marker="o", capsize=3, label=label,
                )  # fmt: skip
            pts = sorted(
                (j["delay"], j["switch"]["mean"]) for j in jumps
                if j["method"] == method and _shift_and_delay(j["group"])[0] == shift
                and j["switch"]["mean"] is not None
            )  # fmt: skip
            if pts:
                ax_j.plot([d for d, _ in pts], [v for _, v in pts], marker="o", label=label)
    ax_s.set(xlabel="inference delay d (control steps)", ylabel="success %", title="success")
    ax_j.set(xlabel="inference delay d (control steps)", ylabel="‖a_k − a_{k−1}‖ at switches",
             title="action jump at chunk switches")  # fmt: skip
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
