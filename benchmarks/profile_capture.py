"""Where a captured sampling loop spends its time: a torch.profiler trace of
``sampler.capture()`` replays (flow Euler 10, B=1, H=50, D=32, bench_sampling's MLP head),
unguided and with ``LatentGuidance`` through an align MLP encoder (the fused kernel) and
through the paper's Transformer encoder (d 512, 9 layers; the default gradient path).

    python benchmarks/profile_capture.py OUT_DIR [--device cuda|cpu] [--calls 50]

Writes ``OUT_DIR/profile_capture.json``: per case the wall time per call, and per call
the number of device kernels and their summed device time (CUDA), or the number of ATen
ops and their summed self CPU time (CPU), plus the ten costliest kernels / ops. On the
GPU it answers whether a captured call is bound by kernel count (many tiny kernels at a
few µs each) or by something else (input copy, host work). Timings are profiled, so
somewhat inflated; the benchmark suites are the reference for latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import B, D, H, Head, latent_guidances
from kernel_profile import kernel_profile

from ate_fast.align.atomic_io import atomic_write_text
from ate_fast.sampling import FlowSampler

GUIDANCES = ("none", "mlp", "transformer")


def make_guidance(kind: str, device: str):
    """None, or ``LatentGuidance`` through an align MLP / the paper's Transformer encoder."""
    if kind == "none":
        return None
    if kind == "mlp":
        return latent_guidances(device)[0]
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    torch.manual_seed(3)
    vae = ActionVAE(D, H, latent_dim=64, arch="transformer").to(device)
    return LatentGuidance(vae, torch.randn(64, device=device), scale=2.0, clamp=0.1)


def profile_case(device: str, guidance_kind: str, calls: int) -> dict:
    model = Head().to(device).requires_grad_(False)
    guidance = make_guidance(guidance_kind, device)
    noise = torch.randn(B, H, D, device=device)
    captured = FlowSampler(model, 10).capture(noise, guidance=guidance, check_finite=False)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        captured(noise)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        captured(noise)
    sync()
    wall_us = (time.perf_counter() - t0) / calls * 1e6

    profiled = kernel_profile(lambda: captured(noise), device, calls)
    return {
        "device": device,
        "guided": guidance is not None,
        "guidance": guidance_kind,
        "calls": calls,
        "wall_us_per_call": wall_us,
        **profiled,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.calls < 1:
        parser.error(f"--calls: expected >= 1, got {args.calls}")
    if args.device == "cpu":
        torch.set_num_threads(1)  # control-rate calls; OpenMP threads stall on a busy machine
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "profile_capture.json"
    cases: list[dict] = []
    for kind in GUIDANCES:
        # the Transformer-guided call is ~0.1 s on the CPU: fewer calls there
        calls = args.calls if args.device == "cuda" or kind != "transformer" else min(args.calls, 5)
        cases.append(profile_case(args.device, kind, calls))
        # rewritten after each case (whole or not at all), so that a run cut at its limit or
        # failing in a later case keeps the cases before
        atomic_write_text(path, json.dumps({"cases": cases}, indent=1) + "\n")
        case = cases[-1]
        counts = {k: round(v, 1) for k, v in case.items() if k.endswith("_per_call")}
        print(f"{args.device} guidance {case['guidance']}: {counts}", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
