"""NoiseSchedule and the timestep grids, value for value against diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.sampling.timesteps import diffusion_timesteps, flow_sigmas

SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", num_train_timesteps=100, beta_start=0.001, beta_end=0.05),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100),
]


@pytest.mark.parametrize("args", SCHEDULES, ids=lambda a: "-".join(map(str, a.values())))
def test_schedule_is_diffusers_float32_values(args):
    ours = NoiseSchedule(**args)
    theirs = diffusers_class("DDPMScheduler")(**args)
    assert ours.alphas_cumprod.dtype == torch.float64
    assert ours.alphas_cumprod.shape == (ours.num_train_timesteps,)
    # Bit-identical after rounding back to float32: the values a diffusers-trained model saw.
    assert torch.equal(ours.betas.float(), theirs.betas)
    assert torch.equal(ours.alphas_cumprod.float(), theirs.alphas_cumprod)
    assert torch.equal(ours.alphas_cumprod.float().double(), ours.alphas_cumprod)
    ac = ours.alphas_cumprod
    assert bool((ac[1:] < ac[:-1]).all()) and 0 < ac[-1] < ac[0] < 1


METHODS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
}


def diffusers_class(name: str):
    # Imported when a test runs, not at collection (the GPU box has no diffusers).
    import diffusers

    return getattr(diffusers, name)


GRIDS = [
    (spacing, n, k, 0)
    for spacing in ("leading", "trailing", "linspace")
    for n, k in ((1000, 10), (1000, 7), (100, 100), (1000, 3), (1000, 1), (50, 16))
] + [("leading", 1000, 10, 1), ("leading", 1000, 3, 5), ("leading", 100, 9, 1)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("spacing,n,k,offset", GRIDS)
def test_diffusion_timesteps_are_diffusers(method, spacing, n, k, offset):
    sched = diffusers_class(METHODS[method])(
        num_train_timesteps=n, timestep_spacing=spacing, steps_offset=offset
    )
    sched.set_timesteps(k)
    expected = sched.timesteps.numpy()
    assert len(expected) == k
    if len(set(expected.tolist())) < k:  # DPM-Solver++'s K + 1 points at K = N: a step h = 0
        assert method == "dpmsolver++" and k == n and spacing != "trailing"
        with pytest.raises(ValueError, match=f"num_steps={k} repeats timestep"):
            diffusion_timesteps(method, k, n, spacing, offset)  # diffusers samples NaN there
        return
    ours = diffusion_timesteps(method, k, n, spacing, offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("shift", [1.0, 1.7, 3.0, 0.5])
@pytest.mark.parametrize("k", [1, 2, 10, 50])
@pytest.mark.parametrize("n", [1000, 100])
def test_flow_grid_is_flowmatch_eulers(shift, k, n):
    sched = diffusers_class("FlowMatchEulerDiscreteScheduler")(num_train_timesteps=n, shift=shift)
    sched.set_timesteps(k)
    ours = flow_sigmas(k, "diffusers", shift, n)
    assert torch.equal(torch.from_numpy(ours).float(), sched.sigmas)
    assert ours[-1] == 0.0


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_uniform_flow_grid_is_openpis(k):
    np.testing.assert_allclose(flow_sigmas(k, "uniform", 1.0, 1000), np.linspace(1, 0, k + 1))
    times = FlowSampler(lambda x, t, c: x, k).times
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == k + 1


def test_sampler_defaults_follow_diffusers():
    schedule = NoiseSchedule()
    model = lambda x, t, c: x  # noqa: E731
    assert DiffusionSampler(model, schedule, "ddim").timestep_spacing == "leading"
    assert DiffusionSampler(model, schedule, "ddpm").timestep_spacing == "leading"
    assert DiffusionSampler(model, schedule, "dpmsolver++").timestep_spacing == "linspace"
    assert (
        repr(schedule)
        == "NoiseSchedule('linear', num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02)"
    )
