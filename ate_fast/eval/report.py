"""Reports of simulator evaluation runs: a Markdown summary, the numbers as JSON, and a
plot of success per method.

:func:`write_report` is the entry point for an output directory (``<out>/runs/*.json``,
see :mod:`ate_fast.eval.stats`); :func:`summary_markdown` and :func:`plot_success` work on
runs already in memory. Success rates are shown in percent and differences (Δ, method −
baseline) in percentage points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from ate_fast.eval.stats import (
    CellSummary,
    GroupKey,
    PairedDifference,
    PooledDifference,
    cell_summary,
    differences_and_pooled,
    load_runs,
    methods_of,
    order_methods,
)

REPORT_SCHEMA = 1


def _compute(
    runs: Sequence[dict[str, Any]], baseline: str, n_boot: int, seed: int, level: float
) -> tuple[list[CellSummary], list[PairedDifference], list[PooledDifference]]:
    """Cell summaries, the paired differences of every other method vs ``baseline``, and
    those differences averaged over the groups where both ran."""
    cells = cell_summary(runs, n_boot=n_boot, seed=seed, level=level)
    diffs: list[PairedDifference] = []
    pooled: list[PooledDifference] = []
    for method in methods_of(runs):
        if method != baseline:
            per_group, p = differences_and_pooled(
                runs, method, baseline, n_boot=n_boot, seed=seed, level=level
            )
            diffs += per_group
            if p is not None:
                pooled.append(p)
    return cells, diffs, pooled


def _group_of(d: PairedDifference) -> GroupKey:
    return d["policy"], d["shift"], d["demos"]


def _setting_label(g: GroupKey) -> str:
    return f"{g[0]} · {g[1]} · N={g[2]}"


def _overview(
    diffs: Sequence[PairedDifference],
    pooled: Sequence[PooledDifference],
    baseline: str,
    method_order: Sequence[str] | None,
    lv: str,
) -> list[str]:
    """Markdown lines: Δ vs baseline, one row per group, one column per method, and a last
    row averaging each method's groups (empty when there is at most one group)."""
    groups = sorted({_group_of(d) for d in diffs})
    if len(groups) < 2:
        return []
    methods = order_methods({d["method"] for d in diffs}, method_order)
    by_key = {(*_group_of(d), d["method"]): d for d in diffs}

    def text(mean: float, ci: Sequence[float], significant: bool) -> str:
        star = " *" if significant else ""
        return f"{_pp(mean)} {_ci(ci, _pp)}{star}"

    lines = [
        "",
        f"## Overview: Δ vs {baseline} (pp, {lv} CI; * = interval excludes 0)",
        "",
        _row(["Setting", *methods]),
        _row(["---"] * (len(methods) + 1)),
    ]
    for g in groups:
        cells = []
        for m in methods:
            d = by_key.get((*g, m))
            cells.append("—" if d is None else text(d["mean"], d["ci"], d["significant"]))
        lines.append(_row([_setting_label(g), *cells]))
    pooled_of = {p["method"]: p for p in pooled}
    cells = []
    for m in methods:
        p = pooled_of.get(m)
        cells.append(
            "—"
            if p is None
            else f"{text(p['mean'], p['ci'], p['significant'])} ({len(p['groups'])})"
        )
    lines += [
        _row(["mean over settings (how many)", *cells]),
        "",
        "Mean over settings: every setting where the method and the baseline both ran weighs "
        "the same; its interval averages the settings' paired bootstrap replicates (settings "
        "resampled independently). Compare methods on it only where the counts agree.",
    ]
    return lines


def _by_group(cells: Iterable[CellSummary]) -> dict[GroupKey, dict[str, CellSummary]]:
    out: dict[GroupKey, dict[str, CellSummary]] = {}
    for c in cells:
        out.setdefault((c["policy"], c["shift"], c["demos"]), {})[c["method"]] = c
    return dict(sorted(out.items()))


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _pp(x: float) -> str:
    return f"{100.0 * x:+.1f}"


def _ci(ci: Sequence[float], fmt: Any = _pct) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _cell(text: object) -> str:
    """Markdown table cell text (pipes escaped)."""
    return str(text).replace("|", "\\|")


def _row(values: Iterable[object]) -> str:
    return "| " + " | ".join(_cell(v) for v in values) + " |"


def _level_pct(level: float) -> str:
    return f"{100.0 * level:g}%"


def _markdown(
    cells: Sequence[CellSummary],
    diffs: Sequence[PairedDifference],
    pooled: Sequence[PooledDifference],
    baseline: str,
    method_order: Sequence[str] | None,
    level: float,
    n_boot: int,
) -> str:
    lv = _level_pct(level)
    diff_of = {(*_group_of(d), d["method"]): d for d in diffs}
    lines = [
        "# Simulator evaluation: success rates",
        "",
        f"Success in %, mean over seeds of each seed's mean over tasks. Intervals: {lv} "
        f"percentile bootstrap ({n_boot} replicates) resampling seeds, then episodes per "
        f"task. Δ: method − `{baseline}` in percentage points, on the seeds both ran, "
        "resampling seeds and episode indices jointly for the two methods (paired); "
        "*significant*: the Δ interval excludes 0.",
        *_overview(diffs, pooled, baseline, method_order, lv),
    ]
    for group, by_method in _by_group(cells).items():
        lines += _group_section(group, by_method, diff_of, baseline, method_order, lv)
    return "\n".join(lines) + "\n"


def _group_section(
    group: GroupKey,
    by_method: dict[str, CellSummary],
    diff_of: dict[tuple[str, str, int, str], PairedDifference],
    baseline: str,
    method_order: Sequence[str] | None,
    lv: str,
) -> list[str]:
    """Markdown lines of one ``(policy, shift, demos)`` group: a row per method (success,
    interval, per-seed values, Δ vs ``baseline``), notes on what a Δ rests on, and the
    per-task table."""
    policy, shift, demos = group
    methods = order_methods(by_method, method_order)
    config = sorted({by_method[m]["config"] for m in methods})
    lines = [
        "",
        f"## {policy} · shift {shift} · {demos} demos (config {', '.join(config)})",
        "",
        _row(
            [
                "Method",
                "Seeds",
                "Success %",
                f"{lv} CI",
                "Per-seed %",
                f"Δ vs {baseline} (pp)",
                f"Δ {lv} CI",
                "Significant",
            ]
        ),
        _row(["---"] * 8),
    ]
    notes: list[str] = []
    for method in methods:
        c = by_method[method]
        delta, why = _delta_cells(method, c, diff_of.get((*group, method)), baseline, by_method)
        notes += why
        per_seed = ", ".join(_pct(v) for v in c["per_seed"])
        lines.append(_row([method, c["seeds"], _pct(c["mean"]), _ci(c["ci"]), per_seed, *delta]))
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return lines + _per_task_table(by_method, methods)


def _delta_cells(
    method: str,
    c: CellSummary,
    d: PairedDifference | None,
    baseline: str,
    by_method: dict[str, CellSummary],
) -> tuple[list[str], list[str]]:
    """``(the Δ, Δ interval and significance cells of the method's row, notes)``."""
    notes: list[str] = []
    if method == baseline:
        delta = ["(baseline)", "—", "—"]
    elif d is None:
        delta = ["n/a", "n/a", "n/a"]
        reason = (
            f"no `{baseline}` runs in this group"
            if baseline not in by_method
            else f"no seed in common with `{baseline}`"
        )
        notes.append(f"`{method}`: no Δ, {reason}.")
    else:
        delta = [_pp(d["mean"]), _ci(d["ci"], _pp), "yes" if d["significant"] else "no"]
        if d["seeds"] < c["seeds"] or d["dropped_seeds"]["baseline"]:
            one = "; one seed, so its interval reflects episode noise only"
            notes.append(
                f"`{method}`: Δ on the seeds both ran only "
                f"({', '.join(map(str, d['seed_values']))})"
                f"{one if d['seeds'] == 1 and c['seeds'] > 1 else ''}."
            )
    if c["seeds"] == 1:
        notes.append(
            f"`{method}`: one seed ({c['seed_values'][0]}); its intervals reflect "
            "episode noise only, not seed-to-seed variation."
        )
    return delta, notes


def _per_task_table(by_method: dict[str, CellSummary], methods: Sequence[str]) -> list[str]:
    """Markdown lines: rows = tasks, columns = methods, success % (mean over seeds)."""
    tasks = sorted({t for m in methods for t in by_method[m]["per_task"]})
    lines = [
        "",
        "Per task (success %, mean over seeds):",
        "",
        _row(["Task", *methods]),
        _row(["---"] * (len(methods) + 1)),
    ]
    for task in tasks:
        values = [by_method[m]["per_task"].get(task, math.nan) for m in methods]
        lines.append(_row([task, *("—" if math.isnan(v) else _pct(v) for v in values)]))
    return lines


def summary_markdown(
    runs: Sequence[dict[str, Any]],
    baseline: str = "direct",
    *,
    method_order: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> str:
    """Markdown summary of ``runs``: per ``(policy, shift, demos)`` a table with one row per
    method (seeds, success %, interval, per-seed values, Δ vs ``baseline`` with its
    paired interval, significant yes/no), then a per-task table (rows = tasks, columns =
    methods). Methods follow ``method_order``; methods not in it follow alphabetically.
    """
    runs = list(runs)
    cells, diffs, pooled = _compute(runs, baseline, n_boot, seed, level)
    return _markdown(cells, diffs, pooled, baseline, method_order, level, n_boot)


def _plot(
    cells: Sequence[CellSummary],
    path: str | Path,
    method_order: Sequence[str] | None,
    level: float,
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = _by_group(cells)
    if not groups:
        raise ValueError("no runs to plot")
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    widest = max(len(m) for m in groups.values())
    fig = Figure(figsize=(max(3.5, 0.9 * widest + 1.5) * ncols, 3.6 * nrows), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    # one colour per method across all panels
    colour = {
        m: f"C{i % 10}"
        for i, m in enumerate(order_methods({c["method"] for c in cells}, method_order))
    }
    for ax, ((policy, shift, demos), by_method) in zip(axes.flat, groups.items()):
        methods = order_methods(by_method, method_order)
        for x, method in enumerate(methods):
            c = by_method[method]
            mean = 100.0 * c["mean"]
            low, high = (100.0 * v for v in c["ci"])
            ax.bar(x, mean, width=0.7, color=colour[method], alpha=0.35)
            ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="k", capsize=4)
            # per-seed dots to the right of the error bar, spread a little
            per_seed = [100.0 * v for v in c["per_seed"]]
            offsets = [0.16 + 0.12 * i / max(1, len(per_seed) - 1) for i in range(len(per_seed))]
            ax.scatter(
                [x + o for o in offsets],
                per_seed,
                s=16,
                color=colour[method],
                edgecolors="k",
                linewidths=0.5,
                zorder=3,
            )
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_ylim(0.0, 100.0)
        ax.set_ylabel("success %")
        ax.set_title(f"{policy} · {shift} · {demos} demos", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"Success per method (bars: mean, error bars: {_level_pct(level)} CI, dots: seeds)"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _plot_differences(
    diffs: Sequence[PairedDifference],
    pooled: Sequence[PooledDifference],
    path: str | Path,
    baseline: str,
    method_order: Sequence[str] | None,
    level: float,
) -> Optional[Path]:
    """Forest plot: one panel per method, one row per setting (and the mean over
    settings), Δ vs ``baseline`` with its interval. None (nothing written) without diffs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not diffs:
        return None
    methods = order_methods({d["method"] for d in diffs}, method_order)
    groups = sorted({_group_of(d) for d in diffs}, reverse=True)
    by_key = {(*_group_of(d), d["method"]): d for d in diffs}
    pooled_of = {p["method"]: p for p in pooled}
    labels = ["mean over settings"] + [_setting_label(g) for g in groups]
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig = Figure(figsize=(3.4 * ncols + 1.6, (0.28 * len(labels) + 1.0) * nrows), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for ax in axes.flat[len(methods) :]:
        ax.set_visible(False)
    for i, (ax, method) in enumerate(zip(axes.flat, methods)):
        entries = [pooled_of.get(method)] + [by_key.get((*g, method)) for g in groups]
        for y, e in enumerate(entries):
            if e is None:
                continue
            mean, (low, high) = 100.0 * e["mean"], (100.0 * v for v in e["ci"])
            colour = ("C3" if mean < 0 else "C2") if e["significant"] else "0.45"
            ax.errorbar(
                mean, y, xerr=[[mean - low], [high - mean]], fmt="D" if y == 0 else "o",
                color=colour, capsize=3, markersize=5 if y == 0 else 4,
            )  # fmt: skip
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.axhline(0.5, color="0.8", linewidth=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if i % ncols == 0 else [""] * len(labels), fontsize=8)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.set_title(method, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"Δ vs {baseline} (pp)", fontsize=8)
    fig.suptitle(
        f"Paired difference vs {baseline}, {_level_pct(level)} CI "
        "(green/red: interval excludes 0; diamond: mean over settings)"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def plot_success(
    runs: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    method_order: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> Path:
    """PNG at ``path``: one panel per ``(policy, shift, demos)`` with each method's mean
    success (bar), its bootstrap interval (error bar) and per-seed values (dots).
    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    Returns ``path``."""
    cells = cell_summary(list(runs), n_boot=n_boot, seed=seed, level=level)
    return _plot(cells, path, method_order, level)


def write_report(
    out_dir: str | Path,
    *,
    baseline: str = "direct",
    method_order: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Path]:
    """Load ``out_dir/runs/*.json`` and write ``summary.md``, ``summary.json``,
    ``success.png`` and (when some method has a baseline to compare with)
    ``differences.png`` into ``out_dir``; return ``{"markdown", "json", "plot"[,
    "differences"]}`` → path.

    ``summary.json``: ``{"schema": 1, "baseline", "level", "n_boot", "seed", "runs":
    number of runs, "cells": [cell_summary entries], "differences": [paired_difference
    entries of every other method vs baseline], "pooled_differences": [pooled_difference
    of every other method over the groups where it and the baseline ran]}``.
    """
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    if not runs:
        raise ValueError(f"no runs in {out_dir / 'runs'}")
    cells, diffs, pooled = _compute(runs, baseline, n_boot, seed, level)
    paths = {
        "markdown": out_dir / "summary.md",
        "json": out_dir / "summary.json",
        "plot": out_dir / "success.png",
    }
    paths["markdown"].write_text(
        _markdown(cells, diffs, pooled, baseline, method_order, level, n_boot)
    )
    numbers = {
        "schema": REPORT_SCHEMA,
        "baseline": baseline,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "runs": len(runs),
        "cells": cells,
        "differences": diffs,
        "pooled_differences": pooled,
    }
    paths["json"].write_text(json.dumps(numbers, indent=2) + "\n")
    _plot(cells, paths["plot"], method_order, level)
    forest = _plot_differences(
        diffs, pooled, out_dir / "differences.png", baseline, method_order, level
    )
    if forest is not None:
        paths["differences"] = forest
    else:  # no baseline to compare with: no stale plot from an earlier report either
        (out_dir / "differences.png").unlink(missing_ok=True)
    return paths
