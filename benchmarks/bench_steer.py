"""Steer training-step overhead: forward + backward of the policy with the plain flow
loss (``eager`` row, the baseline) and with ``Steer.flow_loss`` — fused guidance
(``steer_fused``: the align MLP encoder takes :func:`ate_fast.mlp_guidance`) vs autograd
(``steer_autograd``: the same encoder behind a plain callable, so Steer differentiates it).

Run:  pytest benchmarks/bench_steer.py --benchmark-json=bench_steer.json
      python benchmarks/report.py bench_steer.json

Overhead of a variant = its time − eager; the issue's target is fused overhead ≤ 0.5 × the
autograd overhead. Policy: MLPHead "small" (H=50, D=32); encoder H·D → 256 → 256 → 2·64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ate_fast.align import ActionVAE
from ate_fast.models import make_head
from ate_fast.steer import Steer

H, D, DZ = 50, 32, 64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCHES = [8, 64]
GPU_CALLS = 10


def _cases():
    for device in DEVICES:
        for batch in BATCHES:
            for impl in ("eager", "steer_fused", "steer_autograd"):
                yield pytest.param(device, batch, impl, id=f"{device}-B{batch}-{impl}")


@pytest.mark.parametrize(("device", "batch", "impl"), list(_cases()))
def test_steer_training_step(benchmark, time_calls, device, batch, impl):
    torch.manual_seed(0)
    policy = make_head("mlp", "small", horizon=H, action_dim=D).to(device)
    vae = ActionVAE(D, H, latent_dim=DZ, arch="mlp", hidden_dims=(256, 256)).to(device)
    encoder = vae if impl == "steer_fused" else (lambda a: vae.encoder(a))
    steer = Steer(encoder, scale=2.0, clamp=0.1, check_inputs=False)
    a0 = torch.randn(batch, H, D, device=device)
    noise = torch.randn_like(a0)
    t = torch.rand(batch, device=device)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a0

    def step():
        policy.zero_grad(set_to_none=True)
        v = policy(x_t, t, None)
        if impl == "eager":
            loss = F.mse_loss(v, noise - a0)
        else:
            loss, _ = steer.flow_loss(v, x_t, a0, noise, t)
        loss.backward()
        return loss

    step()
    benchmark.group = f"{device} steer training step B={batch} H={H} D={D}"
    benchmark.extra_info.update(impl=impl, device=device, batch=batch)
    time_calls(step, device, GPU_CALLS, rounds=20)
