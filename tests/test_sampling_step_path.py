"""sample()'s per-step path: CachedLaunch gives the public op's results on every launch, bit
for bit, and a later launch that does not fit the prepared call still gets the op's clear
error; the step finite check deferred to the loop's end (accelerators) names the first bad
step as the eager one (the CPU) does."""

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


def test_deferred_step_check_names_the_first_bad_step(monkeypatch):
    """sample()'s check on an accelerator (flags read once after the loop), run here on
    the CPU: the same error as the eager check, naming the first bad step and source."""
    from ate_fast.sampling import finite

    calls = []

    def model(x, t, cond):
        calls.append(1)
        return x * (float("nan") if len(calls) == 3 else 0.5)

    sampler = FlowSampler(model, 6)
    noise = torch.randn(1, H, D)
    with pytest.raises(ValueError, match=r"step 2: model_fn returned NaN"):
        sampler.sample(noise)
    calls.clear()
    deferred = finite.DeferredFiniteCheck(6, noise.device, "sample()", "check_finite=False")
    monkeypatch.setattr(sampler_module, "finite_check_for", lambda device, steps: deferred)
    with pytest.raises(ValueError, match=r"step 2: model_fn returned NaN or inf in sample\(\)"):
        sampler.sample(noise)
    assert len(calls) == 6  # the loop ran to its end; the flags were read once after it
    assert finite.finite_check_for(torch.device("cpu"), 6).__class__ is finite.EagerFiniteCheck
    assert isinstance(finite.finite_check_for(torch.device("meta"), 6), finite.DeferredFiniteCheck)
