"""sample()'s CachedLaunch: the same results as the public op on every launch, bit for bit,
and a later launch that does not fit the prepared call still gets the op's clear error."""

from __future__ import annotations

import pytest
import torch

import ate_fast.sampling.sampler as sampler_module
from ate_fast import DiffusionSampler, FlowSampler, LatentGuidance, NoiseSchedule
from ate_fast.sampling.launch import CachedLaunch, Launch

H, D = 12, 3


def _model(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    return torch.tanh(x * 0.7 + t.reshape(-1, 1, 1).to(x.dtype) * 0.01)


def _samplers():
    schedule = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    return [
        FlowSampler(_model, 6, method="euler"),
        FlowSampler(_model, 6, method="heun"),
        DiffusionSampler(_model, schedule, method="ddpm", num_steps=6),
        DiffusionSampler(_model, schedule, method="ddim", num_steps=6, eta=0.5),
        DiffusionSampler(_model, schedule, method="dpmsolver++", num_steps=6, solver_order=3),
        DiffusionSampler(_model, schedule, method="ddim", num_steps=6, clip_sample=True),
    ]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("guided", [False, True])
def test_equals_the_public_op(monkeypatch, index, guided):
    sampler = _samplers()[index]
    noise = torch.randn(2, H, D, generator=torch.Generator().manual_seed(index))
    guidance = None
    if guided:
        encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(H * D, 4))
        guidance = LatentGuidance(encoder, torch.zeros(4), scale=3.0, clamp=0.2)
    fast = sampler.sample(noise, guidance=guidance, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(sampler_module, "CachedLaunch", Launch)
    slow = sampler.sample(noise, guidance=guidance, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast, slow)


def test_a_launch_that_does_not_fit_goes_through_the_op():
    launch = CachedLaunch()
    out, x = torch.zeros(2, H, D), torch.randn(2, H, D)
    a, b = torch.ones(2), torch.full((2,), 0.5)
    launch(out, x=x, m=torch.ones(2, H, D), a=a, b=b)
    launch(out, x=x, m=torch.full((2, H, D), 2.0), a=a, b=b)  # the prepared fast path
    torch.testing.assert_close(out, x + 1.0)
    assert len(launch.prepared) == 1
    with pytest.raises((TypeError, ValueError), match="dtype"):
        launch(out, x=x, m=torch.ones(2, H, D, dtype=torch.float64), a=a, b=b)
    with pytest.raises(ValueError, match="shape"):
        launch(out, x=x, m=torch.ones(2, H, D + 1), a=a, b=b)
