"""RTCGuidance(jacobian=False): the policy's Jacobian dropped (g = W ⊙ (Y − x̂₀), no
backward pass) — LeRobot 0.4.4's RTCProcessor (tests_lerobot checks the chunks equal)."""

from __future__ import annotations

import pytest
import torch

from ate_fast import FlowSampler
from ate_fast.errors import ArgumentTypeError
from ate_fast.models import make_head
from ate_fast.realtime import RTCGuidance, prefix_weights

H, D, COND = 12, 3, 5
F64 = torch.float64


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return make_head("mlp", "small", horizon=H, action_dim=D, cond_dim=COND).double().eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    noise, prev = torch.randn(2, 2, H, D, generator=gen, dtype=F64)
    return noise, torch.randn(2, COND, generator=gen, dtype=F64), prev


def jacobian_free_loop(policy, sampler, noise, cond, prev, mask, beta, method):
    """Plain loop: v' = v − min(β, w(t))·W ⊙ (Y − (x − t·v)), no autograd."""
    times = torch.tensor(sampler.times, dtype=F64)
    w_mask = torch.as_tensor(mask, dtype=F64).reshape(1, H, 1)

    def guided(x, t):
        v = policy(x, torch.full((x.shape[0],), float(t), dtype=F64), cond)
        weight = min(beta, float((t**2 + (1 - t) ** 2) / (t * (1 - t)))) if t < 1 else beta
        return v - weight * (prev - (x - t * v)) * w_mask

    x = noise.clone()
    for k in range(sampler.num_steps):
        t, dt = times[k], times[k + 1] - times[k]
        v1 = guided(x, t)
        if method == "euler" or k == sampler.num_steps - 1:
            x = x + dt * v1
        else:
            x = x + 0.5 * dt * (v1 + guided(x + dt * v1, times[k + 1]))
    return x


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_equals_a_plain_jacobian_free_loop(policy, inputs, method, schedule):
    noise, cond, prev = inputs
    sampler = FlowSampler(policy, num_steps=6, method=method)
    rtc = RTCGuidance(prev, 3, execution_horizon=4, max_guidance_weight=5.0,
                      prefix_schedule=schedule, jacobian=False)  # fmt: skip
    assert rtc.mode == "tweedie"
    with torch.no_grad():
        out = sampler.sample(noise, cond, rtc)
        ref = jacobian_free_loop(policy, sampler, noise, cond, prev,
                                 prefix_weights(H, 3, 4, schedule), 5.0, method)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with_jacobian = RTCGuidance(prev, 3, execution_horizon=4, prefix_schedule=schedule)
    full = sampler.sample(noise, cond, with_jacobian)
    assert (full - out).abs().max() > 1e-6  # the Jacobian term is really dropped


def test_capture_and_guided_velocity(policy, inputs):
    noise, cond, prev = inputs
    sampler = FlowSampler(policy, num_steps=5)
    rtc = RTCGuidance(prev, 2, execution_horizon=3, jacobian=False)
    captured = sampler.capture(noise, cond, rtc)
    for delay in (0, 2, 5):
        rtc.set_prefix(prev * 0.5, delay)
        torch.testing.assert_close(captured(noise, cond), sampler.sample(noise, cond, rtc),
                                   rtol=0, atol=0)  # fmt: skip
    x, t = noise[:, :, :], 0.6
    v = rtc.guided_velocity(lambda z: policy(z, torch.full((2,), t, dtype=F64), cond), x, t)
    base = policy(x, torch.full((2,), t, dtype=F64), cond)
    weight = min(5.0, (t**2 + (1 - t) ** 2) / (t * (1 - t)))
    expected = base - weight * (rtc.prev_chunk - (x - t * base)) * rtc.weights
    torch.testing.assert_close(v, expected.detach(), rtol=1e-12, atol=1e-12)


def test_jacobian_must_be_a_bool():
    with pytest.raises(ArgumentTypeError, match="jacobian must be a bool"):
        RTCGuidance(execution_horizon=2, jacobian="no")
