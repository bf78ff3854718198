"""Jetson Orin latency projected from a GPU run's measured fraction of the weight-read floor.

    python benchmarks/jetson_projection.py realsize.json            (bench_realsize.py's report)
    python benchmarks/jetson_projection.py benchmarks/results/<date>-<gpu>.json   (its "realsize")
    python benchmarks/jetson_projection.py realsize.json --bandwidth-gbs 170 --tflops 42.5
        (your module's measured copy bandwidth and tensor throughput instead of the peaks)

A projection, not a measurement. Each real-size row (``bench_realsize.py``: π0's action
expert in bf16, flow Euler 10, the 816-token prefix cache) was timed on a desktop GPU
against its weight-read floor there (bytes read per call ÷ that GPU's measured copy
bandwidth): ``x_floor`` = median / floor. The projection assumes the same ``x_floor`` on
the Orin, against the Orin's floor (the same bytes ÷ its DRAM bandwidth, 204.8 GB/s on an
AGX Orin 64GB):

    projected = x_floor × bytes per call / Orin bandwidth

What it leaves out, each stated with the numbers (docs/jetson.md, "Projected latency"):
the desktop floor divides by a *measured* copy bandwidth, the Orin's by its *peak*
(sustained copies on an Orin reach less, so the projection is optimistic by that ratio:
pass ``--bandwidth-gbs`` with yours); the time between kernels, which does not scale with
bandwidth; and compute — a row whose multiply-adds at the Orin's tensor throughput take
longer than its bytes at its bandwidth (``compute_floor_s`` > ``floor_s``: B = 8 of a
π0-sized expert) is compute-bound there, and the projection is then a lower bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

# Jetson AGX Orin 64GB: LPDDR5 256-bit at 6400 MT/s; 64 third-generation tensor cores
# (Ampere, 256 fp16/bf16 FMA per clock each) at 1.3 GHz: dense fp16/bf16 tensor throughput
ORIN_NAME = "Jetson AGX Orin 64GB"
ORIN_BANDWIDTH = 204.8e9  # bytes/s, peak
ORIN_TENSOR_FLOPS = 64 * 256 * 2 * 1.3e9  # ≈ 42.6e12 FLOP/s, dense bf16/fp16


def project(
    data: dict,
    bandwidth: float = ORIN_BANDWIDTH,
    flops: float = ORIN_TENSOR_FLOPS,
) -> list[dict]:
    """Per timed real-size row of ``data`` (``realsize.json``): the Orin's floor and the
    projected call latency, in seconds.

    Each entry: ``key`` (the row's key), ``B``, ``guidance``, ``row``, ``x_floor`` (measured),
    ``floor_s`` (bytes per call / ``bandwidth``), ``compute_floor_s`` (the row's
    ``floor_flops`` / ``flops``; None when the run did not record them), ``projected_s`` and
    ``compute_bound`` (the compute floor exceeds the bandwidth floor: the projection is a
    lower bound). A dry run's rows (CPU, cut model) are not projected: empty list."""
    if bandwidth <= 0 or flops <= 0:
        raise ValueError(f"bandwidth and flops must be > 0, got {bandwidth} and {flops}")
    if data.get("environment", {}).get("dry_run"):
        return []
    measured_bw = data["bandwidth"]["bytes_per_s"]
    out = []
    for key, row in data["rows"].items():  # in the report's order
        floor_bytes = row.get("floor_bytes", row["floor_s"] * measured_bw)
        floor_s = floor_bytes / bandwidth
        row_flops: Optional[float] = row.get("floor_flops")
        compute_s = None if row_flops is None else row_flops / flops
        out.append({
            "key": key, "B": row["B"], "guidance": row["guidance"], "row": row["row"],
            "x_floor": row["x_floor"], "floor_bytes": floor_bytes, "floor_s": floor_s,
            "compute_floor_s": compute_s, "projected_s": row["x_floor"] * floor_s,
            "compute_bound": compute_s is not None and compute_s > floor_s,
        })  # fmt: skip
    return out


def markdown(
    data: dict, bandwidth: float = ORIN_BANDWIDTH, flops: float = ORIN_TENSOR_FLOPS
) -> str:
    """The projection as a Markdown section (a heading, its assumptions, one table row per
    timed row); a note instead when there is nothing to project."""
    device = data.get("environment", {}).get("device", "?")
    title = f"## {ORIN_NAME}: projected from this run (a projection, not a measurement)"
    entries = project(data, bandwidth, flops)
    if not entries:
        dry = data.get("environment", {}).get("dry_run")
        reason = "a dry run (CPU, cut model)" if dry else "no row timed"
        return f"{title}\n\nNothing to project: {reason}.\n"
    lines = [
        title,
        "",
        f"Each row's measured × floor on {device}, applied to the Orin's weight-read floor (the "
        f"same bytes at {bandwidth / 1e9:.1f} GB/s). Optimistic where the Orin's sustained copy "
        "bandwidth is below that, or the time between kernels is a larger share there; a "
        f"row marked compute-bound (its multiply-adds at {flops / 1e12:.1f} TFLOP/s take longer "
        'than its bytes) is a lower bound. docs/jetson.md, "Projected latency".',
        "",
        "| B | guidance | row | × floor (measured) | Orin floor ms | Orin compute floor ms | "
        "projected ms | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        compute = "–" if e["compute_floor_s"] is None else f"{e['compute_floor_s'] * 1e3:.1f}"
        note = "compute-bound: lower bound" if e["compute_bound"] else ""
        lines.append(
            f"| {e['B']} | {e['guidance']} | {e['row']} | {e['x_floor']:.2f} | "
            f"{e['floor_s'] * 1e3:.1f} | {compute} | {e['projected_s'] * 1e3:.1f} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _realsize(path: Path) -> dict:
    """``realsize.json`` itself, or the ``realsize`` section of a GPU-suite results file."""
    data = json.loads(path.read_text())
    if "rows" not in data:
        data = data.get("realsize") or {}
    if "rows" not in data:
        raise SystemExit(f"{path}: no real-size rows (neither realsize.json nor a suite result)")
    return data


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="realsize.json or <date>-<gpu>.json")
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=ORIN_BANDWIDTH / 1e9,
        help="the module's DRAM bandwidth in GB/s (default: AGX Orin's peak)",
    )
    parser.add_argument(
        "--tflops",
        type=float,
        default=ORIN_TENSOR_FLOPS / 1e12,
        help="dense bf16/fp16 tensor throughput in TFLOP/s (default: AGX Orin)",
    )
    args = parser.parse_args(argv)
    if args.bandwidth_gbs <= 0 or args.tflops <= 0:
        parser.error("--bandwidth-gbs and --tflops must be > 0")
    print(markdown(_realsize(args.results), args.bandwidth_gbs * 1e9, args.tflops * 1e12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
