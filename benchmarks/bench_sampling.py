"""Sampler latency: ate_fast sample() and capture() vs the loops a user would write.

Run:  pytest benchmarks/bench_sampling.py --benchmark-json=bench_sampling.json
      python benchmarks/report.py bench_sampling.json

One group per (device, sampler) problem at B=1, H=50, D=32 with a small MLP head
(32→256→32, GELU; PERFORMANCE.md's "Head MLP"). Rows:

- ``torch_loop``: the plain PyTorch loop (flow: ``x = x + dt·v``; guided: the same with
  the ATE correction written out) — what a user writes by hand.
- ``diffusers``: the scheduler loop (FlowMatchEuler / DDIM / DPM-Solver++), if installed.
- ``flow-euler-10-latent-guided``: ``LatentGuidance`` over an align MLP VAE encoder (the
  fused guidance op) for ate_fast's rows; ``torch_loop`` takes the same encoder's gradient by
  autograd — the end-to-end comparison of issue 5's CPU target.
- ``sample`` (reported as ``eager``): ``sampler.sample(...)``; ``capture``: the captured loop
  (CPU: recorded fused steps replayed into the C++ kernel; CUDA: a CUDA graph).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule

B, H, D = 1, 50, 32
HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(D, 256), nn.Linear(256, D)

    def forward(self, x, t, cond=None):
        h = self.l1(x) + (t.to(x.dtype) * 1e-3).view(-1, 1, 1)
        return self.l2(torch.nn.functional.gelu(h))


class EncoderGuidance:
    """Latent guidance through an MLP encoder 1600→256→256→128 (PERFORMANCE.md), autograd."""

    def __init__(self, device) -> None:
        torch.manual_seed(1)
        self.enc = nn.Sequential(
            nn.Flatten(), nn.Linear(H * D, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
            nn.Linear(256, 128),
        ).to(device).requires_grad_(False)  # fmt: skip
        self.target = torch.randn(128, device=device)
        self.scale, self.clamp, self.mode = 2.0, 0.1, "direct"

    def gradient(self, x, x0_hat, dx0_dx):
        u = x.detach().requires_grad_(True)
        y = -((self.enc(u) - self.target) ** 2).mean(dim=1)
        return torch.autograd.grad(y.sum(), u)[0]


class AutogradLatentGuidance:
    """``−mean‖μ(x) − z*‖²`` through an align MLP encoder by autograd: the eager baseline
    for the fused :class:`ate_fast.LatentGuidance` on the same encoder."""

    def __init__(self, encoder, target) -> None:
        self.encoder, self.target = encoder, target
        self.scale, self.clamp, self.mode = 2.0, 0.1, "direct"

    def gradient(self, x, x0_hat, dx0_dx):
        u = x.detach().requires_grad_(True)
        mu, _ = self.encoder(u)
        y = -((mu - self.target) ** 2).mean(dim=1)
        return torch.autograd.grad(y.sum(), u)[0]


def latent_guidances(device):
    """(fused LatentGuidance, autograd twin) over one ActionVAE MLP encoder
    (H·D → 256 → 256 → 2·64, the PERFORMANCE.md reference encoder)."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    torch.manual_seed(2)
    vae = ActionVAE(D, H, latent_dim=64, arch="mlp", hidden_dims=(256, 256)).to(device)
    target = torch.randn(64, device=device)
    fused = LatentGuidance(vae, target, scale=2.0, clamp=0.1)
    return fused, AutogradLatentGuidance(vae.encoder, target)


SAMPLERS = {
    "flow-euler-10": lambda m: FlowSampler(m, 10),
    "flow-euler-10-guided": lambda m: FlowSampler(m, 10),
    "flow-euler-10-latent-guided": lambda m: FlowSampler(m, 10),
    "ddim-10": lambda m: DiffusionSampler(m, NoiseSchedule(), "ddim", 10),
    "dpmsolver++-5": lambda m: DiffusionSampler(m, NoiseSchedule(), "dpmsolver++", 5),
}


def torch_loop(model, name, guidance):
    """The hand-written flow loop (openpi style), with the correction if guided."""

    def run(noise):
        with torch.no_grad():
            x, k = noise.clone(), 10
            for i in range(k):
                t = torch.full((x.shape[0],), 1.0 - i / k, device=x.device)
                v = model(x, t)
                if guidance is not None:
                    with torch.enable_grad():
                        g = guidance.gradient(x, None, None)
                    c = (-t / (1 - t).clamp_min(1e-6)).view(-1, 1, 1)
                    v = v + guidance.scale * torch.clamp(c * g, -guidance.clamp, guidance.clamp)
                x = x + (-1.0 / k) * v
            return x

    return run


def _diffusers_loop(model, name):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if name.startswith("flow"):
        sched, steps = FlowMatchEulerDiscreteScheduler(), 10
    elif name.startswith("ddim"):
        sched, steps = DDIMScheduler(clip_sample=False), 10
    else:
        sched, steps = DPMSolverMultistepScheduler(), 5

    def run(noise):
        with torch.no_grad():
            sched.set_timesteps(steps, device=noise.device)
            x = noise
            for t in sched.timesteps:
                tt = (t / 1000.0) if name.startswith("flow") else t
                x = sched.step(model(x, tt.expand(x.shape[0])), t, x).prev_sample
            return x

    return run


def _rows(name):
    rows = ["sample", "capture"]
    if name.startswith("flow"):
        rows.append("torch_loop")
    if HAS_DIFFUSERS and not name.endswith("guided"):
        rows.append("diffusers")
    return rows


CASES = [(dev, name, row) for dev in DEVICES for name in SAMPLERS for row in _rows(name)]


@pytest.mark.parametrize("device,name,row", CASES, ids=["-".join(c) for c in CASES])
def test_sampler_latency(benchmark, cuda_sync, device, name, row):
    benchmark.group = f"{device} {name} B={B} H={H} D={D}"
    # report.py's baseline column is "eager": here, ate_fast's own eager sample().
    benchmark.extra_info["impl"] = "eager" if row == "sample" else row
    model = Head().to(device).requires_grad_(False)
    guidance = EncoderGuidance(device) if name.endswith("guided") else None
    if name == "flow-euler-10-latent-guided":
        # ate_fast rows: LatentGuidance (fused MLP-encoder op); torch_loop: autograd twin
        fused, autograd = latent_guidances(device)
        guidance = autograd if row == "torch_loop" else fused
    noise = torch.randn(B, H, D, device=device)
    sampler = SAMPLERS[name](model)
    if row == "sample":
        fn = lambda n: sampler.sample(n, guidance=guidance)  # noqa: E731
    elif row == "capture":
        fn = sampler.capture(noise, guidance=guidance, check_finite=False)
    elif row == "torch_loop":
        fn = torch_loop(model, name, guidance)
    else:
        fn = _diffusers_loop(model, name)

    def call():
        out = fn(noise)
        cuda_sync()
        return out

    for _ in range(3):  # warm-up (first capture call records)
        call()
    benchmark.pedantic(call, rounds=200 if device == "cpu" else 500, warmup_rounds=5)
