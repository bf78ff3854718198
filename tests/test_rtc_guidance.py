"""Real-time chunking (ate_fast.RTCGuidance) against the paper's equations: the soft mask,
the guided sampler against an independent autograd loop (both time conventions),
capture, and the errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import ate_fast
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError
from ate_fast.models import make_head
from ate_fast.realtime import PREFIX_SCHEDULES, RTCGuidance, prefix_weight_table, prefix_weights

H, D, COND = 12, 3, 5
F64 = torch.float64


def paper_mask(horizon: int, d: int, s: int, schedule: str) -> list[float]:
    """W_i element by element, as the paper (eq. 5) and Kinetix's schedules write it."""
    out = []
    for i in range(horizon):
        c = (horizon - s - i) / (horizon - s - d + 1)
        if i < d:
            w = 1.0
        elif i >= horizon - s:
            w = 0.0
        elif schedule == "exp":
            w = c * (math.exp(c) - 1.0) / (math.e - 1.0)
        elif schedule == "linear":
            w = c
        else:
            w = 1.0 if schedule == "ones" else 0.0
        out.append(w)
    return out


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return make_head("mlp", "small", horizon=H, action_dim=D, cond_dim=COND).double().eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, H, D, generator=gen, dtype=F64)
    cond = torch.randn(2, COND, generator=gen, dtype=F64)
    prev = torch.randn(2, H, D, generator=gen, dtype=F64)
    return noise, cond, prev


def reference_rtc(policy, sampler, noise, cond, prev, weights, beta, method="euler", jacobian=True):
    """A plain autograd RTC loop in the openpi convention (x̂₀ = x − t·v, v' = v − w·g);
    ``jacobian=False``: g = W ⊙ (Y − x̂₀), the policy held constant (no autograd)."""
    times = torch.tensor(sampler.times, dtype=F64)
    w_mask = torch.as_tensor(weights, dtype=F64).reshape(-1, H, 1)

    def guided(x, t):
        leaf = x.detach().requires_grad_(jacobian)
        v = policy(leaf, torch.full((x.shape[0],), float(t), dtype=F64), cond)
        x0 = leaf - t * v
        u = (prev - x0.detach()) * w_mask
        (g,) = torch.autograd.grad(x0, leaf, u) if jacobian else (u,)
        weight = min(beta, float((t**2 + (1 - t) ** 2) / (t * (1 - t)))) if t < 1 else beta
        return (v - weight * g).detach()

    x = noise.clone()
    for k in range(sampler.num_steps):
        t, dt = times[k], times[k + 1] - times[k]
        v1 = guided(x, t)
        if method == "euler" or k == sampler.num_steps - 1:
            x = x + dt * v1
        else:
            x_pred = x + dt * v1
            x = x + 0.5 * dt * (v1 + guided(x_pred, times[k + 1]))
    return x


# -- the soft mask ----------------------------------------------------------------------
@pytest.mark.parametrize("schedule", PREFIX_SCHEDULES)
@pytest.mark.parametrize(("horizon", "d", "s"), [(12, 0, 3), (12, 4, 5), (10, 2, 4), (8, 7, 1)])
def test_mask_matches_the_paper(schedule, horizon, d, s):
    got = prefix_weights(horizon, d, s, schedule)
    np.testing.assert_allclose(got, paper_mask(horizon, d, s, schedule), rtol=1e-15, atol=0)
    assert prefix_weight_table(horizon, s, schedule)[d].tolist() == got.tolist()


def test_linear_mask_matches_kinetix_docstring_example():
    # Kinetix's get_prefix_weights(start=2, end=6, total=10): 1 1 4/5 3/5 2/5 1/5 0 0 0 0
    np.testing.assert_allclose(
        prefix_weights(10, 2, 4, "linear"), [1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0], rtol=1e-15
    )


def test_guidance_weight_is_the_papers_clipped_weight():
    tau = np.array([0.0, 0.1, 0.5, 0.9])
    r2 = (1 - tau[1:]) ** 2 / (tau[1:] ** 2 + (1 - tau[1:]) ** 2)
    expected = np.minimum(5.0, np.concatenate([[np.inf], (1 - tau[1:]) / (tau[1:] * r2)]))
    paper = RTCGuidance(execution_horizon=2, convention="paper").coefficient(tau)
    np.testing.assert_allclose(paper, expected, rtol=1e-14)
    # openpi time t = 1 − τ: the same weight, opposite sign (v_openpi = −v_paper)
    openpi = RTCGuidance(execution_horizon=2).coefficient(1.0 - tau)
    np.testing.assert_allclose(openpi, -expected, rtol=1e-14)


# -- the guided sampler -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_sampler_equals_an_autograd_rtc_loop(policy, inputs, method, schedule):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=6, method=method)
    guidance = RTCGuidance(prev, 3, execution_horizon=4, prefix_schedule=schedule)
    with torch.no_grad():
        got = sampler.sample(noise, cond, guidance=guidance)
    weights = prefix_weights(H, 3, 4, schedule)
    want = reference_rtc(policy, sampler, noise, cond, prev, weights, 5.0, method)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_vjp_goes_through_the_model(policy, inputs):
    """Without the policy's Jacobian (g = W ⊙ (Y − x̂₀)) the chunk differs: the VJP matters."""
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=6)
    guidance = RTCGuidance(prev, 3, execution_horizon=4)
    with torch.no_grad():
        got = sampler.sample(noise, cond, guidance=guidance)
    no_jacobian = reference_rtc(policy, sampler, noise, cond, prev, prefix_weights(H, 3, 4), 5.0,
                                jacobian=False)  # fmt: skip
    assert (got - no_jacobian).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_paper_convention_loop_equals_the_openpi_sampler(policy, inputs, method):
    """guided_velocity in the paper's convention (τ = 1 − t, v = −v_openpi), integrated
    forward in τ, gives the FlowSampler's openpi chunk."""
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=5, method=method)
    openpi = RTCGuidance(prev, 2, execution_horizon=3)
    paper = RTCGuidance(prev, 2, execution_horizon=3, convention="paper")
    with torch.no_grad():
        want = sampler.sample(noise, cond, guidance=openpi)

    def velocity(tau):
        t = torch.full((2,), 1.0 - tau, dtype=F64)
        return lambda x: -policy(x, t, cond)

    taus = 1.0 - sampler.times
    x = noise.clone()
    for k in range(sampler.num_steps):
        tau, step = taus[k], taus[k + 1] - taus[k]
        v1 = paper.guided_velocity(velocity(tau), x, tau)
        if method == "euler" or k == sampler.num_steps - 1:
            x = x + step * v1
        else:
            v2 = paper.guided_velocity(velocity(taus[k + 1]), x + step * v1, taus[k + 1])
            x = x + 0.5 * step * (v1 + v2)
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)


def test_openpi_guided_velocity_matches_the_sampler_step(policy, inputs):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=1)
    guidance = RTCGuidance(prev, 2, execution_horizon=3)
    with torch.no_grad():
        want = sampler.sample(noise, cond, guidance=guidance)
    v = guidance.guided_velocity(lambda x: policy(x, torch.ones(2, dtype=F64), cond), noise, 1.0)
    torch.testing.assert_close(noise - v, want, rtol=1e-13, atol=1e-13)


def test_committed_actions_move_to_the_previous_chunk(policy, inputs):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=10)
    d = 4
    with torch.no_grad():
        unguided = sampler.sample(noise, cond).clone()
        guided = sampler.sample(noise, cond, guidance=RTCGuidance(prev, d, execution_horizon=4))
    before = (unguided - prev)[:, :d].abs().mean()
    after = (guided - prev)[:, :d].abs().mean()
    assert after < before / 20, (before, after)
    # the free tail (W = 0) stays the policy's: guidance only reaches it through the model
    assert (guided - prev)[:, -4:].abs().mean() > after * 5


@pytest.mark.parametrize(
    "make",
    [
        lambda prev: RTCGuidance(prev, 3, execution_horizon=4, max_guidance_weight=0.0),
        lambda prev: RTCGuidance(prev, 0, execution_horizon=4, prefix_schedule="zeros"),
    ],
    ids=["beta-0", "zeros-d-0"],
)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_no_guidance_is_bit_identical_to_unguided(policy, inputs, make, method):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=6, method=method)
    with torch.no_grad():
        unguided = sampler.sample(noise, cond).clone()
        guided = sampler.sample(noise, cond, guidance=make(prev))
    assert torch.equal(guided, unguided)


def test_clear_prefix_is_bit_identical_to_unguided(policy, inputs):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=4)
    guidance = RTCGuidance(prev, 3, execution_horizon=4)
    with torch.no_grad():
        unguided = sampler.sample(noise, cond).clone()
        captured = sampler.capture(noise, cond, guidance=guidance)
        guidance.clear_prefix()
        assert torch.equal(captured(noise, cond), unguided)
        assert torch.equal(sampler.sample(noise, cond, guidance=guidance), unguided)


# -- capture ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_one_capture_serves_every_tick_and_delay(policy, inputs, method, dtype):
    noise, cond, prev = (t.to(dtype) for t in inputs)
    model = policy.to(dtype)
    try:
        sampler = ate_fast.FlowSampler(model, num_steps=5, method=method)
        guidance = RTCGuidance(prev, 2, execution_horizon=4)
        with torch.no_grad():
            captured = sampler.capture(noise, cond, guidance=guidance)
            for prefix, delay in [(prev, 2), (prev.flip(1), 0), (2 * prev, 8), (prev, [1, 5])]:
                guidance.set_prefix(prefix, delay)
                for _ in range(2):  # first call records (CPU), the second replays
                    new_noise = torch.randn_like(noise)
                    got = captured(new_noise, cond).clone()
                    want = sampler.sample(new_noise, cond, guidance=guidance)
                    assert torch.equal(got, want)
    finally:
        policy.double()


def test_per_sample_delays_pick_their_rows(inputs):
    _, _, prev = inputs
    guidance = RTCGuidance(prev, [1, 6], execution_horizon=4)
    table = prefix_weight_table(H, 4)
    assert guidance.weights[:, :, 0].tolist() == [table[1].tolist(), table[6].tolist()]
    guidance.set_prefix(prev, torch.tensor(3))
    assert guidance.weights[:, :, 0].tolist() == [table[3].tolist()] * 2
    assert torch.equal(guidance.prev_chunk, prev)


def test_step_finite_check_names_the_model(inputs):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(lambda x, t, c: x * float("nan"), num_steps=3)
    with torch.no_grad(), pytest.raises(NonFiniteError, match="step 0: model_fn"):
        sampler.sample(noise, cond, guidance=RTCGuidance(prev, 1, execution_horizon=4))


def test_exported_from_the_package():
    assert ate_fast.RTCGuidance is RTCGuidance
    assert isinstance(RTCGuidance(execution_horizon=3), ate_fast.Guidance)


# -- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"execution_horizon": 0}, InvalidArgumentError, r"execution_horizon must be in \[1"),
        ({"execution_horizon": 2.0}, ArgumentTypeError, "execution_horizon must be an int"),
        ({"execution_horizon": 12}, InvalidArgumentError, r"execution_horizon must be in \[1, H"),
        ({"execution_horizon": 4, "delay": 9}, InvalidArgumentError, r"delay must be in \[0, 8\]"),
        ({"execution_horizon": 4, "delay": -1}, InvalidArgumentError, "delay must be in"),
        ({"execution_horizon": 4, "delay": [1]}, InvalidArgumentError, "one entry per sample"),
        ({"execution_horizon": 4, "delay": [1, 9]}, InvalidArgumentError, r"delay\[1\] must be"),
        ({"execution_horizon": 4, "delay": 1.5}, ArgumentTypeError, "delay must be an int"),
        ({"execution_horizon": 4, "prefix_schedule": "cos"}, InvalidArgumentError,
         "prefix_schedule must be one of"),
        ({"execution_horizon": 4, "max_guidance_weight": -1.0}, InvalidArgumentError,
         "max_guidance_weight must be >= 0"),
        ({"execution_horizon": 4, "max_guidance_weight": math.inf}, InvalidArgumentError,
         "max_guidance_weight must be finite"),
        ({"execution_horizon": 4, "convention": "diffusers"}, InvalidArgumentError,
         "convention must be one of"),
    ],
)  # fmt: skip
def test_bad_arguments_name_themselves(inputs, kwargs, error, match):
    _, _, prev = inputs
    with pytest.raises(error, match=match):
        RTCGuidance(prev, **kwargs)


@pytest.mark.parametrize(
    ("prev", "error", "match"),
    [
        (np.zeros((1, H, D)), ArgumentTypeError, r"prev_chunk must be a torch.Tensor \[B, H, D\]"),
        (torch.zeros(H, D), InvalidArgumentError, r"prev_chunk must be a non-empty \[B, H, D\]"),
        (torch.zeros(1, H, D, dtype=torch.int64), ArgumentTypeError, "must be floating"),
        (torch.zeros(1, 1, D), InvalidArgumentError, "horizon H >= 2"),
        (torch.full((1, H, D), math.nan), NonFiniteError, "prev_chunk contains NaN"),
    ],
)
def test_bad_prev_chunk(prev, error, match):
    with pytest.raises(error, match=match):
        RTCGuidance(prev, 0, execution_horizon=2)


def test_prefix_keeps_its_shape(inputs):
    _, _, prev = inputs
    guidance = RTCGuidance(prev, 0, execution_horizon=4)
    with pytest.raises(InvalidArgumentError, match="keep the shape and dtype"):
        guidance.set_prefix(prev[:1], 0)
    with pytest.raises(InvalidArgumentError, match="keep the shape and dtype"):
        guidance.set_prefix(prev.float(), 0)


def test_sampling_errors(policy, inputs):
    noise, cond, prev = inputs
    flow = ate_fast.FlowSampler(policy, num_steps=3)
    with torch.no_grad():
        with pytest.raises(InvalidArgumentError, match="no previous chunk: call set_prefix"):
            flow.sample(noise, cond, guidance=RTCGuidance(execution_horizon=4))
        with pytest.raises(InvalidArgumentError, match="x must match prev_chunk"):
            flow.sample(noise[:1], cond[:1], guidance=RTCGuidance(prev, execution_horizon=4))
        paper = RTCGuidance(prev, execution_horizon=4, convention="paper")
        with pytest.raises(InvalidArgumentError, match="FlowSampler integrates in the 'openpi'"):
            flow.sample(noise, cond, guidance=paper)
    # autograd (a model function without its own input-VJP) cannot run in inference_mode
    plain = ate_fast.FlowSampler(lambda x, t, c: policy(x, t, c), num_steps=3)
    with torch.inference_mode(), pytest.raises(InvalidArgumentError, match="inference_mode"):
        plain.sample(noise, cond, guidance=RTCGuidance(prev, execution_horizon=4))
    diffusion = ate_fast.DiffusionSampler(policy, ate_fast.NoiseSchedule(), num_steps=3)
    with pytest.raises(InvalidArgumentError, match="DiffusionSampler does not support it"):
        diffusion.sample(noise, cond, guidance=RTCGuidance(prev, execution_horizon=4))
    # jacobian=False passes the mode check but its flow-time weights would be dropped
    lerobot_rtc = RTCGuidance(prev, execution_horizon=4, jacobian=False)
    with pytest.raises(InvalidArgumentError, match="only FlowSampler applies"):
        diffusion.sample(noise, cond, guidance=lerobot_rtc)


@pytest.mark.parametrize("make", [
    lambda: RTCGuidance(execution_horizon=4),
    lambda: ate_fast.realtime.PrefixInpainting(max_delay=3),
])  # fmt: skip
def test_a_refused_first_prefix_leaves_no_prefix(policy, inputs, make):
    """A first set_prefix refused for its delay left zero buffers behind: sampling then
    returned the unguided chunk instead of saying there is no previous chunk."""
    noise, cond, prev = inputs
    prefix = make()
    with pytest.raises(InvalidArgumentError, match="delay"):
        prefix.set_prefix(prev, 11)
    assert prefix.prev_chunk is None
    with pytest.raises(InvalidArgumentError, match="call set_prefix"):
        prefix.clear_prefix()  # nothing to clear: it was accepted, then sampling refused
    flow = ate_fast.FlowSampler(policy, num_steps=3)
    key = "guidance" if isinstance(prefix, RTCGuidance) else "inpainting"
    with torch.no_grad(), pytest.raises(InvalidArgumentError, match="call set_prefix"):
        flow.sample(noise, cond, **{key: prefix})
    prefix.set_prefix(prev, 2)  # and it still arms on a good one
    assert torch.equal(prefix.prev_chunk, prev)


@pytest.mark.parametrize("make", [
    lambda prev: RTCGuidance(prev, 1, execution_horizon=4),
    lambda prev: ate_fast.realtime.PrefixInpainting(prev, 1, max_delay=3),
])  # fmt: skip
def test_prefix_buffers_keep_no_autograd_history(inputs, make):
    """A prev_chunk with autograd history (a policy output made outside no_grad) made the
    buffers require grad: each later tick's copy chained onto that graph and kept it (and
    the tensors it saved) alive as long as the object."""
    _, _, prev = inputs
    weight = torch.ones((), dtype=prev.dtype, requires_grad=True)
    prefix = make(prev * weight)
    for _ in range(3):
        prefix.set_prefix(prev * weight, 2)
    assert not prefix.prev_chunk.requires_grad and prefix.prev_chunk.grad_fn is None
    assert torch.equal(prefix.prev_chunk, prev)


def test_clear_prefix_needs_a_prefix():
    with pytest.raises(InvalidArgumentError, match="call set_prefix"):
        RTCGuidance(execution_horizon=3).clear_prefix()


def test_docs_example_runs():
    text = (Path(__file__).resolve().parents[1] / "docs" / "rtc.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/rtc.md[python block {i}]", "exec"), {})


def test_to_onnx_refuses_rtc_through_a_model_without_its_own_vjp(policy, inputs, tmp_path):
    """A model function without forward_with_vjp (here: the head behind a lambda) cannot
    be exported with RTC: torch.export does not trace autograd through it."""
    pytest.importorskip("onnx")
    from ate_fast.export import GuidanceExportError, to_onnx

    noise, cond, prev = (t.float() for t in inputs)
    model = policy.float()
    try:
        sampler = ate_fast.FlowSampler(lambda x, t, c: model(x, t, c), num_steps=2)
        guidance = RTCGuidance(prev, 1, execution_horizon=4)
        with pytest.raises(GuidanceExportError, match=r"no input-VJP of its own.*torch\.export"):
            to_onnx(sampler, tmp_path / "rtc.onnx", noise, cond, guidance=guidance)
    finally:
        policy.double()


# -- jacobian=False: the policy's Jacobian dropped (LeRobot 0.4.4's RTCProcessor; tests_lerobot
# checks the chunks equal) -------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_equals_a_plain_jacobian_free_loop(policy, inputs, method, schedule):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=6, method=method)
    rtc = RTCGuidance(prev, 3, execution_horizon=4, max_guidance_weight=5.0,
                      prefix_schedule=schedule, jacobian=False)  # fmt: skip
    assert rtc.mode == "tweedie"
    with torch.no_grad():
        out = sampler.sample(noise, cond, rtc)
        ref = reference_rtc(policy, sampler, noise, cond, prev, prefix_weights(H, 3, 4, schedule),
                            5.0, method, jacobian=False)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with_jacobian = RTCGuidance(prev, 3, execution_horizon=4, prefix_schedule=schedule)
    full = sampler.sample(noise, cond, with_jacobian)
    assert (full - out).abs().max() > 1e-6  # the Jacobian term is really dropped


def test_jacobian_free_capture_and_guided_velocity(policy, inputs):
    noise, cond, prev = inputs
    sampler = ate_fast.FlowSampler(policy, num_steps=5)
    rtc = RTCGuidance(prev, 2, execution_horizon=3, jacobian=False)
    captured = sampler.capture(noise, cond, rtc)
    for delay in (0, 2, 5):
        rtc.set_prefix(prev * 0.5, delay)
        torch.testing.assert_close(captured(noise, cond), sampler.sample(noise, cond, rtc),
                                   rtol=0, atol=0)  # fmt: skip
    x, t = noise, 0.6
    v = rtc.guided_velocity(lambda z: policy(z, torch.full((2,), t, dtype=F64), cond), x, t)
    base = policy(x, torch.full((2,), t, dtype=F64), cond)
    weight = min(5.0, (t**2 + (1 - t) ** 2) / (t * (1 - t)))
    expected = base - weight * (rtc.prev_chunk - (x - t * base)) * rtc.weights
    torch.testing.assert_close(v, expected.detach(), rtol=1e-12, atol=1e-12)


def test_jacobian_must_be_a_bool():
    with pytest.raises(ArgumentTypeError, match="jacobian must be a bool"):
        RTCGuidance(execution_horizon=2, jacobian="no")
