"""Latency of a whole guided flow sampler vs the number of steps, per guided_step backend,
eager ``sample()`` and ``capture()``: writes a CSV and a PNG (committed under results/).

    python benchmarks/plot_sampler_latency.py [--device cpu] [--out benchmarks/results]

Model: the small MLP head (H=50, D=32), B=1, ``LatentGuidance`` over an align MLP encoder
(H·D → 256 → 256 → 2·64). Each point is the median of ``--repeats`` calls (interleaved
per point, after warm-up). The backend is forced with ATE_FAST_BACKEND for the whole
sampler (guided_step and the guidance op).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import torch

from ate_fast.align import ActionVAE
from ate_fast.models import make_head
from ate_fast.ops import backends
from ate_fast.sampling import FlowSampler
from ate_fast.steer import LatentGuidance

H, D, DZ = 50, 32, 64
STEPS = (1, 2, 5, 10, 20)


def _median_ms(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(device: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    policy = make_head("mlp", "small", horizon=H, action_dim=D).to(device).eval()
    vae = ActionVAE(D, H, latent_dim=DZ, arch="mlp", hidden_dims=(256, 256)).to(device)
    guidance = LatentGuidance(vae, torch.randn(DZ, device=device), scale=2.0, clamp=0.1)
    noise = torch.randn(1, H, D, device=device)
    names = ["ref", "cpu"] if device == "cpu" else ["ref", "triton", "cuda"]
    rows = []
    for backend in names:
        os.environ[backends.ENV_VAR] = backend
        backends.reset_caches()
        for steps in STEPS:
            sampler = FlowSampler(policy, num_steps=steps)
            with torch.no_grad():
                captured = sampler.capture(noise, guidance=guidance, check_finite=False)
                for mode, fn in (
                    ("sample", lambda s=sampler: s.sample(noise, guidance=guidance)),
                    ("capture", lambda c=captured: c(noise)),
                ):
                    fn()
                    ms = _median_ms(fn, repeats, device)
                    rows.append({"backend": backend, "mode": mode, "steps": steps, "ms": ms})
    os.environ.pop(backends.ENV_VAR, None)
    backends.reset_caches()
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for mode, style in (("sample", "--"), ("capture", "-")):
            pts = [r for r in rows if r["backend"] == backend and r["mode"] == mode]
            ax.plot([p["steps"] for p in pts], [p["ms"] for p in pts], style, marker="o",
                    label=f"{backend} {mode}")  # fmt: skip
    ax.set_xlabel("flow steps K")
    ax.set_ylabel("latency per sample call (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    rows = measure(args.device, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sampler_latency_vs_steps_{args.device}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["backend", "mode", "steps", "ms"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, Path(f"{stem}.png"),
         f"guided flow sampler, B=1 H={H} D={D}, {args.device}")  # fmt: skip
    for r in rows:
        print(f"{r['backend']:>6} {r['mode']:>7} K={r['steps']:>2}  {r['ms']:.3f} ms")


if __name__ == "__main__":
    main()
