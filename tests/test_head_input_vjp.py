"""The reference heads' own input-VJP (``forward_with_vjp``) against autograd, and the
sampler's use of it for real-time chunking (``"policy_vjp"`` guidance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ate_fast
from ate_fast.models import FlowTransformerHead, make_head
from ate_fast.realtime import RTCGuidance
from ate_fast.sampling.sampler import forward_with_vjp_of

F64 = torch.float64
HEADS = {
    "mlp-small": ("mlp", "small", {}),
    "mlp-flat": ("mlp", "flat", {"horizon": 8, "action_dim": 3}),
    "mlp-cond-depth3": ("mlp", "small", {"cond_dim": 6, "depth": 3}),
    "ft-small": ("flow-transformer", "small", {}),
    "ft-kv2": ("flow-transformer", "small", {"num_kv_heads": 2, "horizon": 10, "action_dim": 4}),
    "ft-mha": ("flow-transformer", "small", {"num_kv_heads": 4, "horizon": 7, "depth": 2}),
    # π0's action expert: 8 query heads sharing 1 key/value head of dim 256, width 1024
    "pi0-expert-2-blocks": ("flow-transformer", "pi0-expert", {"depth": 2}),
}
# float32 against the float64 autograd VJP, relative to max|g|: measured ≤ 9e-7 for every
# head above (B = 2, random weights and inputs; autograd in float32: the same, 3e-7 to
# 9e-7); the bound leaves 10x headroom.
F32_RTOL = 1e-5


def build(key: str, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(0)
    name, config, overrides = HEADS[key]
    return make_head(name, config, **overrides).to(dtype).eval()


def inputs(head: nn.Module, cond: bool, batch: int = 2, dtype: torch.dtype = F64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    cfg = head.config
    x = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype)
    c = None
    if isinstance(head, FlowTransformerHead) and cond:
        c = torch.randn(batch, 5, cfg.width, generator=gen, dtype=dtype)
    elif getattr(cfg, "cond_dim", 0):
        c = torch.randn(batch, cfg.cond_dim, generator=gen, dtype=dtype)
    u = torch.randn(x.shape, generator=gen, dtype=dtype)
    return x, t, c, u


def autograd_vjp(head: nn.Module, x, t, cond, u):
    leaf = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = head(leaf, t, cond)
        (g,) = torch.autograd.grad(out, leaf, u)
    return out.detach(), g


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("cond", [False, True], ids=["no-cond", "cond"])
@pytest.mark.parametrize("key", list(HEADS))
def test_matches_autograd_in_float64(key, cond):
    head = build(key)
    x, t, c, u = inputs(head, cond)
    with torch.no_grad():
        out, pullback = head.forward_with_vjp(x, t, c)
        g = pullback(u)
    want_out, want_g = autograd_vjp(head, x, t, c, u)
    assert torch.equal(out, want_out)  # the forward is the module's, op for op
    torch.testing.assert_close(g, want_g, rtol=1e-12, atol=1e-12 * float(want_g.abs().max()))


@pytest.mark.parametrize("key", list(HEADS))
def test_float32_within_documented_tolerance(key):
    head64 = build(key)
    x, t, c, u = inputs(head64, True)
    _, want = autograd_vjp(head64, x, t, c, u)
    head = build(key, torch.float32)
    with torch.no_grad():
        _, pullback = head.forward_with_vjp(*(None if v is None else v.float() for v in (x, t, c)))
        g = pullback(u.float())
    assert rel(g, want) <= F32_RTOL


def test_pullback_is_linear_and_reusable():
    head = build("ft-kv2")
    x, t, c, u = inputs(head, True)
    with torch.no_grad():
        _, pullback = head.forward_with_vjp(x, t, c)
        torch.testing.assert_close(pullback(2 * u - x), 2 * pullback(u) - pullback(x))


def test_runs_under_inference_mode():
    head = build("mlp-small")
    x, t, c, u = inputs(head, False)
    with torch.inference_mode():
        _, pullback = head.forward_with_vjp(x, t, c)
        g = pullback(u)
    torch.testing.assert_close(g, autograd_vjp(head, x, t, c, u)[1], rtol=1e-12, atol=1e-12)


# -- which model functions the sampler takes the VJP from ------------------------------
class _OwnForward(type(build("mlp-small"))):
    def forward(self, x, t, cond=None):
        return 2 * super().forward(x, t, cond)


def test_forward_with_vjp_is_found_only_where_it_computes_the_model():
    head = build("mlp-small")
    assert forward_with_vjp_of(head) == head.forward_with_vjp
    assert forward_with_vjp_of(head.forward) == head.forward_with_vjp
    assert forward_with_vjp_of(lambda x, t, c: head(x, t, c)) is None
    assert forward_with_vjp_of(_OwnForward()) is None  # overrides forward only
    handle = head.register_forward_hook(lambda module, args, out: out)
    try:
        assert forward_with_vjp_of(head) is None  # a hook would be skipped
    finally:
        handle.remove()
    assert forward_with_vjp_of(make_head("unet1d", "small")) is None


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("key", ["mlp-cond-depth3", "ft-small"])
def test_rtc_sampler_equals_the_autograd_path(key, method):
    head = build(key)
    noise, _, cond, prev = inputs(head, True)
    guidance = RTCGuidance(prev, 2, execution_horizon=3)
    fast = ate_fast.FlowSampler(head, num_steps=4, method=method)
    slow = ate_fast.FlowSampler(lambda x, t, c: head(x, t, c), num_steps=4, method=method)
    with torch.no_grad():
        got = fast.sample(noise, cond, guidance=guidance).clone()
        want = slow.sample(noise, cond, guidance=guidance)
        unguided = fast.sample(noise, cond)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert rel(got, unguided) > 1e-3  # the guidance acts


def test_rtc_capture_in_inference_mode():
    head = build("ft-small", torch.float32)
    noise, _, cond, prev = inputs(head, True, dtype=torch.float32)
    guidance = RTCGuidance(prev, 2, execution_horizon=3)
    sampler = ate_fast.FlowSampler(head, num_steps=3)
    with torch.inference_mode():
        captured = sampler.capture(noise, cond, guidance=guidance)
        for delay in (2, 5):
            guidance.set_prefix(prev, delay)
            for _ in range(2):
                got = captured(noise, cond).clone()
                assert torch.equal(got, sampler.sample(noise, cond, guidance=guidance))


@pytest.mark.cuda
@pytest.mark.parametrize("key", ["mlp-small", "ft-small"])
def test_rtc_cuda_graph_equals_the_autograd_path(key):
    head = build(key, torch.float32).cuda()
    noise, _, cond, prev = (
        None if v is None else v.cuda() for v in inputs(head.cpu(), True, dtype=torch.float32)
    )
    head.cuda()
    guidance = RTCGuidance(prev, 3, execution_horizon=4)
    fast = ate_fast.FlowSampler(head, num_steps=5)
    slow = ate_fast.FlowSampler(lambda x, t, c: head(x, t, c), num_steps=5)
    with torch.no_grad():
        captured = fast.capture(noise, cond, guidance=guidance)
        got = captured(noise, cond).clone()
        want = slow.sample(noise, cond, guidance=guidance)
    assert rel(got, want) < 1e-4  # float32 rounding of two different VJP computations
    assert rel(got, fast.sample(noise, cond, guidance=guidance)) < 1e-6  # graph vs eager
