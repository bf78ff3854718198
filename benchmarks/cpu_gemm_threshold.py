"""Where oneDNN should start, timed in whole calls: ``cpu_gemm.MIN_MACS`` (the fewest
multiply-adds a GEMM takes oneDNN's op for; ATen's below) against other thresholds, on
the CI gate's head cases — the eager loop a user writes and ``capture()`` — rows
interleaved round by round (reversed every other round), one torch thread, oneDNN selected.

    python benchmarks/cpu_gemm_threshold.py [--cases mlp-small mlp-small-guided
        flow-transformer-small unet1d-small] [--min-macs 1.5e6 4e6 8e6] [--rounds 5]

Per case and threshold: each row's fastest round (ms) and eager / ``capture()`` (> 1:
``capture()`` faster). ``MIN_MACS`` was set from single GEMMs timed alone; inside a step
the choice also decides how the step's other GEMMs (ATen's MKL) meet the caches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ci_gate

from ate_fast.models import cpu_gemm

# name -> bench_ci_gate._head_pair's arguments (head, sampler, guidance)
CASES = {
    "mlp-small": ("mlp-small", "flow-euler-10", "unguided"),
    "mlp-small-guided": ("mlp-small", "flow-euler-10", "mlp-default-guided"),
    "flow-transformer-small": ("flow-transformer-small", "flow-euler-10", "unguided"),
    "unet1d-small": ("unet1d-small", "ddim-10", "unguided"),
}


def at_threshold(macs: int, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` with ``cpu_gemm.MIN_MACS = macs`` (read at every GEMM), restored after."""

    def call() -> torch.Tensor:
        before = cpu_gemm.MIN_MACS
        cpu_gemm.MIN_MACS = macs
        try:
            return fn()
        finally:
            cpu_gemm.MIN_MACS = before

    return call


def timed(rows: dict[str, Callable[[], torch.Tensor]], rounds: int, calls: int) -> dict[str, float]:
    """Each row's fastest call over ``rounds`` rounds of ``calls`` calls, seconds."""
    for fn in rows.values():
        fn()
    best = dict.fromkeys(rows, float("inf"))
    for r in range(rounds):
        for name, fn in list(rows.items())[:: 1 if r % 2 == 0 else -1]:
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--min-macs", nargs="+", type=float, default=[1.5e6, 4e6, 8e6])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ[cpu_gemm.ENV_VAR] = "onednn"
    print(f"torch {torch.__version__}, 1 thread, {cpu_gemm.ENV_VAR}=onednn, "
          f"MIN_MACS default {cpu_gemm.MIN_MACS:,}")  # fmt: skip
    print("| case | MIN_MACS | eager ms | `capture()` ms | eager / `capture()` |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        head, sampler, guidance = CASES[case]
        pair = bench_ci_gate._head_pair(head, sampler, "eager", "capture", guidance)
        rows = {}
        for macs in args.min_macs:
            rows[f"eager {macs:g}"] = at_threshold(int(macs), pair.baseline.fn)
            rows[f"capture {macs:g}"] = at_threshold(int(macs), pair.candidate.fn)
        start = time.perf_counter()
        pair.baseline.fn()
        calls = max(1, int(0.3 / (time.perf_counter() - start)))  # ≈ 0.3 s per row and round
        best = timed(rows, args.rounds, calls)
        for macs in args.min_macs:
            eager, captured = best[f"eager {macs:g}"], best[f"capture {macs:g}"]
            print(f"| {case} | {macs:,.0f} | {eager * 1e3:.3f} | {captured * 1e3:.3f} | "
                  f"{eager / captured:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
