"""CPU sampler latency on a shared machine: the implementations interleaved round by round.

    python benchmarks/bench_sampling_cpu.py [--threads 1] [--rounds 300]

Same problems and rows as bench_sampling.py (B=1, H=50, D=32, MLP head 32→256→32), but
each round times every implementation once, in turn, so that load from other processes
falls on all of them alike; prints the median per call. pytest-benchmark times one
implementation after another, which on a busy 2-core machine mixes in whatever else
ran meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import (
    HAS_DIFFUSERS,
    SAMPLERS,
    B,
    D,
    EncoderGuidance,
    H,
    Head,
    _diffusers_loop,
    torch_loop,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Head().requires_grad_(False)
    noise = torch.randn(B, H, D)
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={B} H={H} D={D}, median µs")
    for name, make in SAMPLERS.items():
        guidance = EncoderGuidance("cpu") if name.endswith("guided") else None
        sampler = make(model)
        impls = {
            "sample": lambda n, s=sampler, g=guidance: s.sample(n, guidance=g),
            "capture": sampler.capture(noise, guidance=guidance, check_finite=False),
        }
        if name.startswith("flow"):
            impls["torch_loop"] = torch_loop(model, name, guidance)
        if HAS_DIFFUSERS and guidance is None:
            impls["diffusers"] = _diffusers_loop(model, name)
        times: dict[str, list] = {k: [] for k in impls}
        for fn in impls.values():
            for _ in range(5):
                fn(noise)
        for _ in range(args.rounds):
            for key, fn in impls.items():
                t0 = time.perf_counter()
                fn(noise)
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        cells = "  ".join(f"{k} {v:7.1f}" for k, v in med.items())
        print(f"{name:22s} {cells}  (capture: {med['sample'] / med['capture']:.2f}x sample)")


if __name__ == "__main__":
    main()
