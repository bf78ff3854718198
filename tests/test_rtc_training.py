"""Training-time real-time chunking (ate_fast.realtime.TrainingTimeRTC) and its sampler
option (PrefixInpainting, FlowSampler's ``inpainting=``): the prefix out of the loss, the
plain loss at max_delay 0, the committed prefix kept exactly, capture, Steer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ate_fast
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.models import make_head
from ate_fast.realtime import PrefixInpainting, TrainingTimeRTC
from ate_fast.steer import Steer

B, H, D, COND = 4, 8, 3, 5


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return make_head("mlp", "small", horizon=H, action_dim=D, cond_dim=COND).eval()


def batch(seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a0 = torch.randn(B, H, D, generator=gen, dtype=dtype)
    noise = torch.randn(B, H, D, generator=gen, dtype=dtype)
    t = torch.rand(B, generator=gen, dtype=dtype)
    cond = torch.randn(B, COND, generator=gen, dtype=dtype)
    return a0, noise, t, cond


def test_prefix_clean_and_excluded_from_the_loss(policy):
    rtc = TrainingTimeRTC(max_delay=4)
    a0, noise, t, cond = batch()
    delays = torch.tensor([0, 1, 3, 4])
    pb = rtc.prefix_batch(a0, noise, t, delays)
    tt = t[:, None, None]
    plain_x = tt * noise + (1 - tt) * a0
    for b, d in enumerate(delays.tolist()):
        assert torch.equal(pb.x_t[b, :d], a0[b, :d])
        assert torch.equal(pb.x_t[b, d:], plain_x[b, d:])
        assert torch.equal(pb.postfix[b, :, 0], (torch.arange(H) >= d).float())
    v = policy(pb.x_t, t, cond)
    per = rtc.flow_loss(v, pb, a0, noise, loss_reduction="none")
    err = (v - (noise - a0)).square()
    for b, d in enumerate(delays.tolist()):
        assert torch.equal(per[b, :d], torch.zeros(d, D))
        assert torch.equal(per[b, d:], err[b, d:])
    # the prefix's prediction does not reach the loss: its gradient there is exactly 0
    v_leaf = v.detach().requires_grad_(True)
    rtc.flow_loss(v_leaf, pb, a0, noise).backward()
    for b, d in enumerate(delays.tolist()):
        assert torch.equal(v_leaf.grad[b, :d], torch.zeros(d, D))
        assert (v_leaf.grad[b, d:] != 0).all()
    expected = sum(err[b, d:].sum() for b, d in enumerate(delays.tolist()))
    count = sum((H - d) * D for d in delays.tolist())
    torch.testing.assert_close(rtc.flow_loss(v, pb, a0, noise), expected / count)


@pytest.mark.parametrize("convention", ["openpi", "paper"])
def test_max_delay_zero_is_the_plain_flow_loss_bit_for_bit(policy, convention):
    rtc = TrainingTimeRTC(max_delay=0)
    a0, noise, t, cond = batch(1)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    delays = rtc.draw_delays(B, gen)
    assert torch.equal(delays, torch.zeros(B, dtype=torch.int64))
    assert torch.equal(gen.get_state(), state)  # nothing drawn: paired with plain training
    pb = rtc.prefix_batch(a0, noise, t, delays, convention)
    tt = t[:, None, None]
    if convention == "openpi":
        x_t, target = tt * noise + (1 - tt) * a0, noise - a0
    else:
        x_t, target = tt * a0 + (1 - tt) * noise, a0 - noise
    assert torch.equal(pb.x_t, x_t)
    v = policy(pb.x_t, t, cond)
    plain = nn.functional.mse_loss(v, target)
    assert torch.equal(rtc.flow_loss(v, pb, a0, noise, convention), plain)
    assert torch.equal(rtc.flow_loss(v, pb, a0, noise, convention, loss_reduction="none"),
                       (v - target).square())  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(64, 50, 32), (256, 16, 7), (3, 5, 2)])
def test_max_delay_zero_in_every_dtype(dtype, shape):
    """Half-precision chunks too: the sum and count accumulate in float32 at least (in
    float16 both pass 65504 at B, H, D = 64, 50, 32: the loss was inf / inf = NaN)."""
    gen = torch.Generator().manual_seed(0)
    a0, noise, v = (torch.randn(*shape, generator=gen).to(dtype) for _ in range(3))
    t = torch.rand(shape[0], generator=gen).to(dtype)
    rtc = TrainingTimeRTC(max_delay=0)
    pb = rtc.prefix_batch(a0, noise, t, rtc.draw_delays(shape[0]))
    loss = rtc.flow_loss(v, pb, a0, noise)
    assert loss.dtype == dtype and torch.isfinite(loss)
    assert torch.equal(loss, nn.functional.mse_loss(v, noise - a0))


def test_delay_distributions():
    gen = torch.Generator().manual_seed(0)
    uniform = TrainingTimeRTC(max_delay=3, min_delay=1)
    assert uniform.probabilities().tolist() == [0.0, 1 / 3, 1 / 3, 1 / 3]
    d = uniform.draw_delays(3000, gen)
    assert d.min() == 1 and d.max() == 3
    exp = TrainingTimeRTC(max_delay=3, distribution="exp", exp_decay=1.0)
    p = exp.probabilities()
    assert abs(p.sum() - 1) < 1e-12 and all(p[i] > p[i + 1] for i in range(3))
    counts = torch.bincount(exp.draw_delays(20000, gen), minlength=4).double() / 20000
    assert (counts - torch.tensor(p)).abs().max() < 0.02


def test_composes_with_steer_at_scale_zero(policy):
    rtc = TrainingTimeRTC(max_delay=3)
    a0, noise, t, cond = batch(2)
    pb = rtc.prefix_batch(a0, noise, t, rtc.draw_delays(B, torch.Generator().manual_seed(3)))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(H * D, 4))
    steer = Steer(encoder, scale=0.0)
    v = policy(pb.x_t, t, cond)
    per = steer.flow_loss(v, pb.x_t, a0, noise, t, loss_reduction="none").loss
    assert torch.equal(rtc.masked_mean(per, pb), rtc.flow_loss(v, pb, a0, noise))
    # and at a non-zero scale the prefix is still out of the loss
    per = Steer(encoder, scale=-2.0).flow_loss(v, pb.x_t, a0, noise, t, loss_reduction="none")
    v_leaf = v.detach().requires_grad_(True)
    steer_loss = Steer(encoder, scale=-2.0).flow_loss(
        v_leaf, pb.x_t, a0, noise, t, loss_reduction="none"
    )
    rtc.masked_mean(steer_loss.loss, pb).backward()
    assert torch.equal(v_leaf.grad * (1 - pb.postfix), torch.zeros_like(v_leaf))
    assert per.loss.shape == (B, H, D)


def aligned(prev: torch.Tensor, s: int) -> torch.Tensor:
    return torch.cat([prev[:, s:], prev[:, -1:].expand(-1, s, -1)], dim=1)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_inpainting_keeps_the_committed_prefix_exactly(policy, method):
    sampler = ate_fast.FlowSampler(policy, num_steps=5, method=method)
    a0, noise, _, cond = batch(4)
    y = aligned(a0, 4)
    delays = [0, 1, 2, 4]
    inpaint = PrefixInpainting(y, delays, max_delay=4)
    with torch.no_grad():
        out = sampler.sample(noise, cond, inpainting=inpaint)
        plain = sampler.sample(noise, cond)
        inpaint.clear_prefix()
        cleared = sampler.sample(noise, cond, inpainting=inpaint)
    for b, d in enumerate(delays):
        assert torch.equal(out[b, :d], y[b, :d])
    assert torch.equal(out[0], plain[0])  # delay 0: the unguided chunk
    assert not torch.equal(out[3], plain[3])  # the prefix changed what follows
    assert torch.equal(cleared, plain)


def test_inpainting_capture_equals_sample_for_every_delay(policy):
    sampler = ate_fast.FlowSampler(policy, num_steps=4)
    a0, noise, _, cond = batch(6)
    inpaint = PrefixInpainting(a0, 0, max_delay=4)
    with torch.no_grad():
        replay = sampler.capture(noise, cond, inpainting=inpaint)
        for delay in (3, 0, 4, [1, 2, 3, 4]):
            y = aligned(torch.randn(B, H, D), 4)
            fresh = torch.randn(B, H, D)
            inpaint.set_prefix(y, delay)
            got = replay(fresh, cond).clone()
            want = sampler.sample(fresh, cond, inpainting=inpaint)
            assert torch.equal(got, want)
            ds = delay if isinstance(delay, list) else [delay] * B
            for b, d in enumerate(ds):
                assert torch.equal(got[b, :d], y[b, :d])


def test_inpainting_first_set_under_inference_mode(policy):
    """A deployment's first tick often runs under torch.inference_mode(): the buffers made
    there are written in place on every later tick, also outside it (as RTCGuidance's)."""
    sampler = ate_fast.FlowSampler(policy, num_steps=3)
    a0, noise, _, cond = batch(8)
    with torch.inference_mode():
        inpaint = PrefixInpainting(a0, 2, max_delay=3)
    with torch.no_grad():
        inpaint.set_prefix(aligned(a0, 3), 1)
        out = sampler.sample(noise, cond, inpainting=inpaint)
    assert torch.equal(out[:, :1], aligned(a0, 3)[:, :1])


def test_inpainting_composes_with_rtc_guidance(policy):
    sampler = ate_fast.FlowSampler(policy, num_steps=4)
    a0, noise, _, cond = batch(7)
    y = aligned(a0, 4)
    rtc = ate_fast.RTCGuidance(y, 2, execution_horizon=4)
    out = sampler.sample(noise, cond, guidance=rtc, inpainting=PrefixInpainting(y, 2, max_delay=2))
    assert torch.equal(out[:, :2], y[:, :2])


def test_errors(policy):
    with pytest.raises(InvalidArgumentError, match="max_delay"):
        TrainingTimeRTC(max_delay=-1)
    with pytest.raises(InvalidArgumentError, match="min_delay"):
        TrainingTimeRTC(max_delay=2, min_delay=3)
    with pytest.raises(InvalidArgumentError, match="distribution"):
        TrainingTimeRTC(max_delay=2, distribution="normal")
    rtc = TrainingTimeRTC(max_delay=H)
    a0, noise, t, cond = batch()
    with pytest.raises(InvalidArgumentError, match="max_delay must be < H"):
        rtc.prefix_batch(a0, noise, t, torch.zeros(B, dtype=torch.int64))
    with pytest.raises(InvalidArgumentError, match="delays must lie"):
        TrainingTimeRTC(max_delay=2).prefix_batch(a0, noise, t, torch.full((B,), 3))
    with pytest.raises(InvalidArgumentError, match="delay must be in"):
        PrefixInpainting(a0, 3, max_delay=2)
    with pytest.raises(InvalidArgumentError, match="max_delay must be <= H"):
        PrefixInpainting(a0, 0, max_delay=H + 1)
    sampler = ate_fast.FlowSampler(policy, num_steps=2)
    with pytest.raises(InvalidArgumentError, match="no prefix"):
        sampler.sample(noise, cond, inpainting=PrefixInpainting(max_delay=2))
    with pytest.raises(InvalidArgumentError, match="noise must match"):
        sampler.sample(noise[:2], cond[:2], inpainting=PrefixInpainting(a0, 1, max_delay=2))
    with pytest.raises(ArgumentTypeError, match="inpainting must be None"):
        sampler.sample(noise, cond, inpainting=object())
    diffusion = ate_fast.DiffusionSampler(lambda x, t, c: x, ate_fast.NoiseSchedule("linear"))
    with pytest.raises(InvalidArgumentError, match="not supported by DiffusionSampler"):
        diffusion.sample(noise, inpainting=PrefixInpainting(a0, 1, max_delay=2))
