"""Attention's softmax backward on the CPU: the C++ kernel (``block_epilogues_cpu.
softmax_backward``, the native path's) against ATen's ops, alone and inside real-time
chunking's captured call.

    python benchmarks/cpu_softmax_backward.py [--rounds 41] [--json OUT.json]

One torch thread, float32. The op alone: ``(p, ds)`` from scores and dp [1, 1, rows, keys]
(the flow transformer's grouped query rows against its keys), ATen's ``softmax`` + product,
row sum, difference and products (what ``flow_transformer_vjp.softmax_backward`` ran
before the kernel) vs the kernel, both into 16-byte-aligned rows; fastest of 5 repeats.
The call: the small flow transformer's ``capture()`` with ``RTCGuidance(Y, d=5,
execution_horizon=25)``, flow Euler 10, B = 1, without conditioning and with an 816-token
prefix cache, the VJP's softmax backward swapped between the two implementations (this
script replaces ``flow_transformer_vjp.softmax_backward``; nothing else changes) round by
round, alternating order; the figure is the median over rounds of the paired ratio
ATen / kernel (> 1: the kernel faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import timeit
from typing import Callable

import torch

from ate_fast import FlowSampler
from ate_fast.models import FlowTransformerHead, block_epilogues_cpu
from ate_fast.models import flow_transformer_vjp as vjp
from ate_fast.models.gemm_alignment import aligned_rows
from ate_fast.realtime import RTCGuidance

OP_SHAPES = [(200, 50), (400, 50), (400, 866), (3200, 866)]  # rows (B·H·g), keys
SCALE = 0.125


def aten_softmax_backward(scores: torch.Tensor, dp: torch.Tensor, scale: float):
    """The torch ops' ``(p, ds)``, into aligned rows (the VJP's torch path)."""
    p = torch.softmax(scores * scale, dim=-1, out=aligned_rows(scores.shape, scores))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    return p, torch.mul(ds, scale, out=aligned_rows(ds.shape, ds))


def kernel_softmax_backward(scores: torch.Tensor, dp: torch.Tensor, scale: float):
    out = aligned_rows(scores.shape, scores), aligned_rows(scores.shape, scores)
    return block_epilogues_cpu.softmax_backward(scores, dp, scale, *out)


def time_op(rows: int, keys: int) -> dict:
    g = torch.Generator().manual_seed(0)
    scores, dp = (torch.randn(1, 1, rows, keys, generator=g) for _ in range(2))
    seconds = {}
    for name, fn in (("aten", aten_softmax_backward), ("kernel", kernel_softmax_backward)):
        number = max(5, 2_000_000 // (rows * keys))
        seconds[name] = min(timeit.repeat(lambda f=fn: f(scores, dp, SCALE), number=number,
                                          repeat=5)) / number  # fmt: skip
    return {"us": {k: v * 1e6 for k, v in seconds.items()}, "aten_over_kernel":
            seconds["aten"] / seconds["kernel"]}  # fmt: skip


def time_call(prefix: int, rounds: int) -> dict:
    torch.manual_seed(0)
    head = FlowTransformerHead("small").eval()
    noise, prev = torch.randn(1, 50, 32), torch.randn(1, 50, 32)
    with torch.no_grad():
        cond = head.prefix_cache(torch.randn(1, prefix, 256)) if prefix else None
    sampler = FlowSampler(head, 10)
    guidance = RTCGuidance(prev, 5, execution_horizon=25)
    captured = sampler.capture(noise, cond, guidance, check_finite=False)
    original = vjp.softmax_backward

    def run(fn: Callable) -> float:
        vjp.softmax_backward = fn
        try:
            start = time.perf_counter()
            captured(noise, cond)
            return time.perf_counter() - start
        finally:
            vjp.softmax_backward = original

    rows = {"aten": aten_softmax_backward, "kernel": original}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():  # warm
        run(fn)
    for r in range(rounds):
        for name in rows if r % 2 else reversed(rows):
            times[name].append(run(rows[name]))
    ratio = statistics.median(a / k for a, k in zip(times["aten"], times["kernel"]))
    return {"ms_fastest": {k: min(v) * 1e3 for k, v in times.items()}, "aten_over_kernel": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ops = {f"{r}x{k}": time_op(r, k) for r, k in OP_SHAPES}
    calls = {f"prefix {n}": time_call(n, args.rounds) for n in (0, 816)}
    print(f"torch {torch.__version__}, 1 thread, {platform.processor() or platform.machine()}")
    print("| softmax backward [1, 1, rows, keys] | ATen µs | kernel µs | ATen / kernel |")
    print("|---|---|---|---|")
    for name, r in ops.items():
        print(f"| {name} | {r['us']['aten']:.1f} | {r['us']['kernel']:.1f} | "
              f"{r['aten_over_kernel']:.2f}× |")  # fmt: skip
    print("\n| RTC capture(), flow transformer small | ATen ms | kernel ms | ATen / kernel |")
    print("|---|---|---|---|")
    for name, r in calls.items():
        print(f"| {name} | {r['ms_fastest']['aten']:.1f} | {r['ms_fastest']['kernel']:.1f} | "
              f"{r['aten_over_kernel']:.3f}× |")  # fmt: skip
    if args.json:
        meta = {"torch": torch.__version__, "threads": 1, "rounds": args.rounds}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "op": ops, "rtc_capture": calls}, f, indent=1)


if __name__ == "__main__":
    main()
