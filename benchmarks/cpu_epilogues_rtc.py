"""The flow transformer's native CPU epilogues against ATen's ops, in the captured call with
and without real-time chunking, for a float32 or bfloat16 head.

    python benchmarks/cpu_epilogues_rtc.py [--head flow-transformer-small] [--dtype bfloat16]
                                           [--rounds 15] [--json OUT.json]

One torch thread, B = 1, flow Euler 10, no conditioning. Rows: ``capture()`` unguided and
``capture()`` with ``RTCGuidance(Y, d=5, execution_horizon=20)`` (the head's input-VJP every
step), each with ``ATE_FAST_FLOW_EPILOGUES=native`` (the CPU's default: the gated GELU,
RMSNorms, rotation, their VJPs and attention's softmax backward as C++ kernels) and
``=torch`` (ATen's ops), set per call. Each round calls every row once, in turn (reversed
every other round); a ratio is the median over rounds of the paired ratio torch / native
(> 1: the kernels faster). Prints each row's fastest call and the two ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_heads

from ate_fast import FlowSampler
from ate_fast.models import block_epilogues
from ate_fast.realtime import RTCGuidance


def under_path(path: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` with ``ATE_FAST_FLOW_EPILOGUES=path`` for the call (read per op), then unset."""

    def call() -> torch.Tensor:
        os.environ[block_epilogues.ENV_VAR] = path
        try:
            return fn()
        finally:
            os.environ.pop(block_epilogues.ENV_VAR, None)

    return call


def rows(head_id: str, dtype: torch.dtype) -> dict[str, Callable[[], torch.Tensor]]:
    """The four rows: ``{unguided, rtc}_{native, torch}``."""
    head = copy.deepcopy(bench_heads._head("cpu", head_id)).to(dtype)
    horizon, action_dim = bench_heads._shape(head_id)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, horizon, action_dim, generator=g)
    prev = torch.randn(1, horizon, action_dim, generator=g)
    rtc = RTCGuidance(prev, 5, execution_horizon=20)
    calls = {
        "unguided": FlowSampler(head, 10).capture(noise, check_finite=False),
        "rtc": FlowSampler(head, 10).capture(noise, guidance=rtc, check_finite=False),
    }
    return {
        f"{name}_{path}": under_path(path, lambda c=call: c(noise))
        for name, call in calls.items()
        for path in ("native", "torch")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--head",
        default="flow-transformer-small",
        choices=[h for h in bench_heads.HEADS if h.startswith("flow-transformer")],
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the times and ratios here")
    args = parser.parse_args()  # fmt: skip
    torch.set_num_threads(1)
    impls = rows(args.head, getattr(torch, args.dtype))
    for fn in impls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(args.rounds):
        for name, fn in list(impls.items())[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    fastest = {name: min(t) for name, t in times.items()}
    ratios = {}
    for call in ("unguided", "rtc"):
        pairs = zip(times[f"{call}_torch"], times[f"{call}_native"])
        ratios[call] = statistics.median(a / b for a, b in pairs)
    print(f"torch {torch.__version__}, one thread, {platform.machine()}, {args.head} {args.dtype}, "
          f"{args.rounds} rounds")  # fmt: skip
    print("| call | native | torch ops | torch / native |\n|---|---|---|---|")
    for call in ("unguided", "rtc"):
        print(f"| {call} | {fastest[f'{call}_native'] * 1e3:.1f} ms | "
              f"{fastest[f'{call}_torch'] * 1e3:.1f} ms | {ratios[call]:.3f}× |")  # fmt: skip
    if args.json:
        meta = {"torch": torch.__version__, "head": args.head, "dtype": args.dtype,
                "rounds": args.rounds, "machine": platform.machine()}  # fmt: skip
        args.json.write_text(
            json.dumps({"meta": meta, "seconds": fastest, "torch_over_native": ratios}, indent=1)
        )


if __name__ == "__main__":
    main()
