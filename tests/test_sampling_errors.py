"""Bad input to the samplers gets a clear error naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule

B, H, D = 2, 5, 3


def identity_model(x, t, cond):
    return x * 0.5


class Guide:
    def __init__(self, scale=1.0, clamp=0.1, mode="direct", out=None):
        self.scale, self.clamp, self.mode = scale, clamp, mode
        self.out = out

    def gradient(self, x, x0_hat, dx0_dx):
        return torch.ones_like(x) if self.out is None else self.out


@pytest.fixture
def noise():
    return torch.randn(B, H, D)


SAMPLERS = {
    "flow": lambda model=identity_model, **kw: FlowSampler(model, 4, **kw),
    "ddim": lambda model=identity_model, **kw: DiffusionSampler(
        model, NoiseSchedule(num_train_timesteps=100), "ddim", 4, **kw
    ),
}


# -- construction -------------------------------------------------------------------
@pytest.mark.parametrize("steps", [0, -3])
def test_num_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        FlowSampler(identity_model, steps)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        DiffusionSampler(identity_model, NoiseSchedule(), "ddim", steps)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmsolver_num_steps_that_repeat_a_timestep(spacing):
    """DPM-Solver++ spaces K + 1 points: at K = N two coincide (a step of length 0, whose
    coefficients are inf / NaN); named at construction, not an internal assertion later.
    K = N − 1, and DDIM at K = N, still sample."""
    schedule = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    with pytest.raises(ValueError, match=r"num_steps=100 repeats timestep"):
        DiffusionSampler(identity_model, schedule, "dpmsolver++", 100, timestep_spacing=spacing)
    for method, steps in (("dpmsolver++", 99), ("ddim", 100)):
        sampler = DiffusionSampler(identity_model, schedule, method, steps,
                                   timestep_spacing=spacing)  # fmt: skip
        assert len(set(sampler.timesteps.tolist())) == steps
        assert torch.isfinite(sampler.sample(torch.randn(B, H, D))).all()


@pytest.mark.parametrize("steps", [2.5, True, "10"])
def test_num_steps_must_be_an_int(steps):
    with pytest.raises(TypeError, match="num_steps must be an int"):
        FlowSampler(identity_model, steps)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="euler"), "method must be one of"),
        (dict(prediction_type="velocity"), "prediction_type must be one of"),
        (dict(timestep_spacing="uniform"), "timestep_spacing must be one of"),
        (dict(solver_order=4, method="dpmsolver++"), "solver_order must be one of"),
        (dict(eta=-0.1), "eta must be"),
        (dict(eta=float("nan")), "eta must be"),
        (dict(eta=0.5, method="ddpm"), "eta=0.5 does not apply to method='ddpm'"),
        (dict(clip_sample=True, method="dpmsolver++"), "clip_sample=True does not apply"),
        (dict(solver_order=3, method="ddim"), "solver_order=3 does not apply"),
        (dict(set_alpha_to_one=False, method="ddpm"), "set_alpha_to_one=False does not apply"),
        (dict(clip_sample_range=0.0, clip_sample=True), "clip_sample_range must be > 0"),
        (dict(steps_offset=-1), "steps_offset must be >= 0"),
        (dict(num_steps=1001), r"num_steps \(1001\) must be <= .* num_train_timesteps \(1000\)"),
        (dict(steps_offset=100), r"steps_offset=100 puts a timestep at 1000, outside .*\[0, 999\]"),
        (dict(eta=5.0), "eta=5.0 is too large"),
    ],
)
def test_diffusion_options(kwargs, match):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ddim")
    steps = kwargs.pop("num_steps", 10)
    with pytest.raises(ValueError, match=match):
        DiffusionSampler(identity_model, NoiseSchedule(), method, steps, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        # a bool or a float equal to a choice is not that choice (True == 1, 2.0 == 2)
        (dict(method="dpmsolver++", solver_order=True), ValueError, "solver_order must be one of"),
        (dict(method="dpmsolver++", solver_order=2.0), ValueError, "solver_order must be one of"),
        (dict(steps_offset=True), TypeError, "steps_offset must be an int, got bool"),
        (dict(eta="0.5"), TypeError, "eta must be a float, got str"),
        (dict(eta=True), TypeError, "eta must be a float, got bool"),
        (dict(clip_sample=True, clip_sample_range="1"), TypeError, "clip_sample_range must be a"),
    ],
)
def test_diffusion_options_of_the_wrong_kind(kwargs, error, match):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ddim")
    with pytest.raises(error, match=match):
        DiffusionSampler(identity_model, NoiseSchedule(), method, 10, **kwargs)


def test_numpy_integers_are_ints():
    sampler = DiffusionSampler(identity_model, NoiseSchedule(num_train_timesteps=np.int64(100)),
                               "ddim", np.int32(5), steps_offset=np.int64(1))  # fmt: skip
    assert type(sampler.num_steps) is int and sampler.num_steps == 5
    assert type(sampler.schedule.num_train_timesteps) is int
    with pytest.raises(TypeError, match="beta_start must be a float, got str"):
        NoiseSchedule(beta_start="0.1")


def test_schedule_and_model_types():
    with pytest.raises(TypeError, match="schedule must be a NoiseSchedule"):
        DiffusionSampler(identity_model, "squaredcos_cap_v2")
    with pytest.raises(TypeError, match="model_fn must be callable"):
        FlowSampler(None)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        NoiseSchedule("cosine")
    with pytest.raises(ValueError, match="num_train_timesteps must be >= 2"):
        NoiseSchedule(num_train_timesteps=1)
    with pytest.raises(ValueError, match="beta_end must be in"):
        NoiseSchedule(beta_end=1.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="ddim"), "method must be one of"),
        (dict(time_grid="cosine"), "time_grid must be one of"),
        (dict(time_grid="diffusers", shift=0.0), "shift must be > 0"),
        (dict(time_grid="diffusers", shift=math.inf), "shift must be finite"),
        (dict(shift=2.0), "shift=2.0 applies to time_grid='diffusers' only"),
        (dict(time_grid="diffusers", num_train_timesteps=1), "num_train_timesteps must be"),
    ],
)
def test_flow_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowSampler(identity_model, 4, **kwargs)


# -- call arguments -------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SAMPLERS))
@pytest.mark.parametrize(
    "bad,error,match",
    [
        ([[1.0]], TypeError, "noise must be a torch.Tensor"),
        (torch.randn(B, H * D), ValueError, r"noise must have shape \[B, H, D\]"),
        (torch.randn(1, B, H, D), ValueError, r"noise must have shape \[B, H, D\]"),
        (torch.zeros(0, H, D), ValueError, "noise must not be empty"),
        (torch.zeros(B, H, D, dtype=torch.int64), TypeError, "noise must be float32"),
    ],
)
def test_bad_noise(kind, bad, error, match):
    with pytest.raises(error, match=match):
        SAMPLERS[kind]().sample(bad)


@pytest.mark.parametrize("kind", list(SAMPLERS))
@pytest.mark.parametrize("value,what", [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")])
def test_non_finite_noise_and_cond(kind, noise, value, what):
    sampler = SAMPLERS[kind]()
    bad = noise.clone()
    bad[1, 2, 0] = value
    with pytest.raises(ValueError, match=f"noise contains {what}"):
        sampler.sample(bad)
    with pytest.raises(ValueError, match=f"cond contains {what}"):
        sampler.sample(noise, bad)
    cond = {"image": torch.randn(B, 4), "state": [torch.randn(B, 2), bad]}
    with pytest.raises(ValueError, match=rf"cond\['state'\]\[1\] contains {what}"):
        sampler.sample(noise, cond)
    # Integer tensors (token ids) are not checked and pass through.
    sampler.sample(noise, {"tokens": torch.arange(B)})


@pytest.mark.parametrize("kind", list(SAMPLERS))
@pytest.mark.parametrize(
    "output,error,match",
    [
        (lambda x: x[:, :-1], ValueError, r"model_fn returned shape \(2, 4, 3\), expected"),
        (lambda x: x.double(), TypeError, "model_fn returned dtype torch.float64"),
        (lambda x: x.numpy(), TypeError, "model_fn must return a torch.Tensor"),
    ],
)
def test_bad_model_output(kind, noise, output, error, match):
    sampler = SAMPLERS[kind](model=lambda x, t, cond: output(x))
    with pytest.raises(error, match=match):
        sampler.sample(noise)


def test_non_contiguous_model_output_is_accepted(noise):
    def model(x, t, cond):
        return (0.5 * x).transpose(1, 2).contiguous().transpose(1, 2)

    out = SAMPLERS["flow"](model=model).sample(noise)
    ref = SAMPLERS["flow"]().sample(noise)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", list(SAMPLERS))
@pytest.mark.parametrize(
    "guidance,error,match",
    [
        (object(), TypeError, "guidance must follow ate_fast.Guidance.*no 'scale'"),
        (Guide(mode="tweedy"), ValueError, "guidance.mode must be one of"),
        (Guide(scale=math.nan), ValueError, "guidance.scale must be finite"),
        (Guide(scale="2"), TypeError, "guidance.scale must be a float, got str"),
        (Guide(clamp=-0.1), ValueError, r"guidance.clamp must be >= 0\.0 \(math.inf: no clamp\)"),
        (Guide(out=torch.ones(B, H)), ValueError, "guidance.gradient returned shape"),
        (Guide(out=torch.ones(B, H, D, dtype=torch.float64)), TypeError, "guidance.gradient"),
    ],
)
def test_bad_guidance(kind, noise, guidance, error, match):
    with pytest.raises(error, match=match):
        SAMPLERS[kind]().sample(noise, guidance=guidance)


def test_guidance_gradient_must_be_callable(noise):
    guide = Guide()
    guide.gradient = 3
    with pytest.raises(TypeError, match=r"guidance\.gradient must be callable"):
        SAMPLERS["flow"]().sample(noise, guidance=guide)


@pytest.mark.parametrize("method", ["sample", "capture"])
def test_a_bad_call_gradient_is_named(noise, method):
    def run(guide):
        if method == "sample":
            return sampler.sample(noise, guidance=guide)
        return sampler.capture(noise, guidance=guide)(noise)  # the CPU loop runs at a call

    guide = Guide()
    guide.call_gradient = 3
    sampler = SAMPLERS["flow"]()
    with pytest.raises(TypeError, match=r"guidance\.call_gradient must be None or callable"):
        run(guide)
    guide.call_gradient = lambda: None  # callable, but returns no function
    with pytest.raises(TypeError, match=r"guidance\.call_gradient\(\) must return a function"):
        run(guide)


def test_tweedie_needs_an_x0_that_depends_on_x(noise):
    sampler = SAMPLERS["ddim"](prediction_type="sample")
    with pytest.raises(
        ValueError, match="mode='tweedie' is undefined for prediction_type='sample'"
    ):
        sampler.sample(noise, guidance=Guide(mode="tweedie"))
    sampler.sample(noise, guidance=Guide(mode="direct"))  # direct is fine


def test_bad_generator_and_callback(noise):
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None"):
        SAMPLERS["ddim"](eta=1.0).sample(noise, generator=0)
    with pytest.raises(TypeError, match="callback must be callable"):
        SAMPLERS["flow"]().sample(noise, callback=1)


# -- captured loops -------------------------------------------------------------------
def test_captured_call_checks(noise):
    guide = Guide()
    cond = {"a": torch.randn(B, 4)}
    captured = SAMPLERS["flow"]().capture(noise, cond, guidance=guide)
    captured(noise, cond)
    with pytest.raises(
        ValueError, match=r"noise must match the captured example: shape \(2, 5, 3\)"
    ):
        captured(torch.randn(B + 1, H, D), cond)
    with pytest.raises(ValueError, match="noise must match the captured example"):
        captured(noise.double(), cond)
    with pytest.raises(ValueError, match=r"cond\['a'\] must match the captured example"):
        captured(noise, {"a": torch.randn(B, 5)})
    with pytest.raises(ValueError, match="cond must have the captured keys"):
        captured(noise, {"b": torch.randn(B, 4)})
    with pytest.raises(ValueError, match="cond must have the captured keys"):
        captured(noise, None)
    with pytest.raises(ValueError, match="guidance must be None or the object given to capture"):
        captured(noise, cond, guidance=Guide())
    with pytest.raises(ValueError, match="generator must be None or the generator given"):
        captured(noise, cond, generator=torch.Generator())
    bad = noise.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="noise contains NaN"):
        captured(bad, cond)
    guide.scale = 3.0
    with pytest.raises(ValueError, match=r"guidance's \(scale, clamp, mode\) changed"):
        captured(noise, cond)


def test_diffusion_repr_names_every_setting_that_changes_the_update():
    """An exported graph records repr(sampler) as what it computes: eta, clipping and the
    solver order were missing from it."""
    schedule = NoiseSchedule(num_train_timesteps=100)
    ddim = DiffusionSampler(identity_model, schedule, "ddim", 4, eta=0.5, clip_sample=True,
                            clip_sample_range=2.0, steps_offset=1)  # fmt: skip
    for part in ("eta=0.5", "clip_sample=True", "clip_sample_range=2.0", "steps_offset=1"):
        assert part in repr(ddim)
    assert "solver_order=3" in repr(DiffusionSampler(identity_model, schedule, "dpmsolver++",
                                                     4, solver_order=3))  # fmt: skip
    plain = repr(DiffusionSampler(identity_model, schedule, "ddpm", 4))
    assert "eta=" not in plain and "clip" not in plain and "solver_order" not in plain
