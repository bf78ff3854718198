"""FlowTransformerHead with a prefix KV cache (what π0's expert reads every step): equal to
passing the prefix tokens, bit for bit, in the forward, its input-VJP, sampling, RTC and
capture; the cache is checked."""

from __future__ import annotations

import pytest
import torch

from ate_fast import FlowSampler, RTCGuidance, make_head
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import PrefixCache
from ate_fast.ops.backends import MIN_TRITON

H, D, L, WIDTH = 16, 4, 24, 256


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cache_equals_tokens(head, dtype):
    model = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    model.load_state_dict(head.state_dict())
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(1)
    x, u = torch.randn(2, 2, H, D, generator=gen, dtype=dtype)
    t, cond = torch.rand(2, generator=gen, dtype=dtype), torch.randn(2, L, WIDTH, dtype=dtype)
    with torch.no_grad():
        cache = model.prefix_cache(cond)
        assert isinstance(cache, PrefixCache) and cache.length == L
        assert len(cache.keys) == model.config.depth
        assert cache.keys[0].shape == (2, model.config.num_kv_heads, L, model.config.head_dim)
        assert torch.equal(model(x, t, cache), model(x, t, cond))
        out_c, pull_c = model.forward_with_vjp(x, t, cache)
        out_t, pull_t = model.forward_with_vjp(x, t, cond)
        assert torch.equal(out_c, out_t) and torch.equal(pull_c(u), pull_t(u))
    assert not torch.equal(model(x, t, cond), model(x, t, None))  # the prefix matters


def test_sampling_rtc_and_capture_with_a_cache(head):
    gen = torch.Generator().manual_seed(2)
    noise, prev = torch.randn(2, 2, H, D, generator=gen)
    cond = torch.randn(2, L, WIDTH, generator=gen)
    with torch.no_grad():
        cache = head.prefix_cache(cond)
    sampler = FlowSampler(head, num_steps=5)
    rtc = RTCGuidance(prev, 3, execution_horizon=6)
    for guidance in (None, rtc):
        with_tokens = sampler.sample(noise, cond, guidance)
        with_cache = sampler.sample(noise, cache, guidance)
        assert torch.equal(with_cache, with_tokens)
    captured = sampler.capture(noise, cache, rtc)
    with torch.no_grad():
        other = head.prefix_cache(torch.randn(2, L, WIDTH, generator=gen))
    for c in (cache, other):  # a new observation's cache is copied into the capture
        torch.testing.assert_close(captured(noise, c), sampler.sample(noise, c, rtc),
                                   rtol=0, atol=0)  # fmt: skip


def test_bad_caches_are_named(head):
    x, t = torch.randn(2, H, D), torch.rand(2)
    with torch.no_grad():
        cache = head.prefix_cache(torch.randn(2, L, WIDTH))
    short = PrefixCache(cache.keys[:-1], cache.values[:-1])
    with pytest.raises(ValueError, match="PrefixCache of 3 keys and 3 values; this head has 4"):
        head(x, t, short)
    wrong = PrefixCache((cache.keys[0][:1], *cache.keys[1:]), cache.values)
    with pytest.raises(ValueError, match=r"cond\.keys\[0\] must be a floating tensor"):
        head(x, t, wrong)
    with pytest.raises(ValueError, match=r"cond must have shape \[B, L, width\]"):
        head.prefix_cache(torch.randn(2, L, 7))


@pytest.mark.parametrize("epilogues", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_prefix_buffers_equal_the_concatenation(head, dtype, epilogues, monkeypatch):
    """A call's steps keep the prefix's keys and values in one buffer per block, each step
    writing its action rows behind them (block_epilogues.PrefixSlot): every step equals the
    forward that concatenates the prefix in front, bit for bit, whatever the previous step
    left in the buffer."""
    if epilogues == "triton":
        pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", epilogues)
    model = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    model.load_state_dict(head.state_dict())
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(3, 2, H, D, generator=gen)
    t = torch.rand(3, 2, generator=gen)
    with torch.no_grad():
        cache = model.prefix_cache(torch.randn(2, L, WIDTH, generator=gen).to(dtype))
        steps = model.step_features(xs[0], t, cache)
        assert steps[0].slots is steps[2].slots  # one set of buffers per call
        for x, features in zip(xs, steps):
            got = model.forward_features(x, features)
            want = model.forward_features(x, features._replace(slots=None))
            assert torch.equal(got, want)
        assert not torch.equal(got, model.forward_features(xs[0], steps[2]))


def test_prefix_buffers_with_pullbacks_and_autograd(head):
    """The input-VJP through the buffers equals the one through the concatenation, bit for
    bit; a pullback called after another forward with the same features (which rewrote the
    buffers' action rows) raises instead of reading them; with weights that require grad
    the forward concatenates (autograd cannot record the in-place writes)."""
    gen = torch.Generator().manual_seed(5)
    x1, x2, u = torch.randn(3, 2, H, D, generator=gen)
    t = torch.rand(2, 2, generator=gen)
    with torch.no_grad():
        cache = head.prefix_cache(torch.randn(2, L, WIDTH, generator=gen))
        steps = head.step_features(x1, t, cache)
        for x, features in ((x1, steps[0]), (x2, steps[1]), (x1, steps[0])):
            out, pull = head.forward_with_vjp_features(x, features)
            out_c, pull_c = head.forward_with_vjp_features(x, features._replace(slots=None))
            assert torch.equal(out, out_c) and torch.equal(pull(u), pull_c(u))
        _, pull = head.forward_with_vjp_features(x1, steps[0])
        pull(u)  # as often as wanted, before the next forward
        head.forward_features(x2, steps[1])  # rewrites the buffers' action rows
        with pytest.raises(InvalidArgumentError, match="pullback reads keys and values"):
            pull(u)
    trained = make_head("flow-transformer", "small", horizon=H, action_dim=D)
    trained.load_state_dict(head.state_dict())  # weights require grad
    steps = trained.step_features(x1, t, cache)
    out = trained.forward_features(x1, steps[0])
    out.square().sum().backward()
    assert trained.blocks[0].kv.weight.grad is not None
    # the same ops as the concatenating path under autograd (with Triton epilogues selected
    # a no-grad forward would take the kernels, which round differently)
    assert torch.equal(out, trained.forward_features(x1, steps[0]._replace(slots=None)))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
)  # fmt: skip
def test_prefix_buffers_in_captured_sampling(head, device, monkeypatch):
    """A captured loop (a CUDA graph on the GPU: the buffers are allocated and written inside
    it) with the prefix buffers equals sample() with the concatenation, unguided and with
    RTC (whose pullback reads the buffers): bit for bit on the CPU; on the GPU to float32
    rounding (a graph's GEMMs may pick other algorithms; stale or missing keys are O(1))."""
    model = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    model.load_state_dict(head.state_dict())
    model = model.to(device)
    gen = torch.Generator().manual_seed(6)
    noise, prev = torch.randn(2, 2, H, D, generator=gen).to(device)
    with torch.no_grad():
        cache = model.prefix_cache(torch.randn(2, L, WIDTH, generator=gen).to(device))
    sampler = FlowSampler(model, num_steps=5)
    for guidance in (None, RTCGuidance(prev, 3, execution_horizon=6)):
        captured = sampler.capture(noise, cache, guidance)
        with_buffers = captured(noise, cache).clone()
        with monkeypatch.context() as patched:  # every forward concatenates
            patched.setattr("ate_fast.models.flow_transformer.writes_in_place", lambda *t: False)
            concatenated = sampler.sample(noise, cache, guidance)
        if device == "cpu":
            assert torch.equal(with_buffers, concatenated)
        else:
            scale = float(concatenated.abs().max())
            torch.testing.assert_close(with_buffers, concatenated, rtol=0, atol=1e-5 * scale)


# -- a padded prefix (PrefixCache.mask, openpi's prefix mask) ---------------------------------


def _masks(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """bool [B, L]: sample 0 right-padded (as openpi pads a prompt), the others with random
    holes; every sample keeps at least one real token."""
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[0] = torch.arange(length) < length // 3
    mask[:, 0] = True
    return mask


def _per_sample(model, x, t, tokens, mask, u=None):
    """Each sample alone with only its real tokens (no mask): (out, input-VJP of u)."""
    outs, grads = [], []
    for b in range(x.shape[0]):
        real = tokens[b : b + 1, mask[b]]
        out, pull = model.forward_with_vjp(x[b : b + 1], t[b : b + 1], real)
        outs.append(out)
        grads.append(pull(u[b : b + 1]) if u is not None else out)
    return torch.cat(outs), torch.cat(grads)


def test_a_padded_prefix_gives_what_its_real_tokens_give(head):
    """float64: with a mask, each sample's forward and input-VJP equal those of its real
    tokens alone (padded keys hidden, positions counting real tokens only: openpi's rule),
    whatever the padded tokens hold; the hand-written VJP equals autograd's."""
    model = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    model.load_state_dict(head.state_dict())
    model = model.double()
    gen = torch.Generator().manual_seed(7)
    x, u = torch.randn(2, 3, H, D, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    tokens = torch.randn(3, L, WIDTH, generator=gen, dtype=torch.float64)
    mask = _masks(gen, 3, L)
    with torch.no_grad():
        cache = model.prefix_cache(tokens, mask)
        assert cache.mask is mask
        out, pull = model.forward_with_vjp(x, t, cache)
        grad = pull(u)
        want_out, want_grad = _per_sample(model, x, t, tokens, mask, u)
        torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-12)
        assert torch.equal(model(x, t, cache), out)
        junk = torch.where(mask[..., None], tokens, 1e3 * torch.randn_like(tokens))
        torch.testing.assert_close(model(x, t, model.prefix_cache(junk, mask)), out,
                                   rtol=0, atol=1e-12)  # fmt: skip
        unmasked = model(x, t, model.prefix_cache(tokens))
        assert (unmasked - out).abs().max() > 1e-3  # the mask matters
    leaf = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(model(leaf, t, cache), leaf, u)
    torch.testing.assert_close(grad, autograd, rtol=0, atol=1e-12)


def test_a_padded_prefix_in_sampling_rtc_and_capture(head):
    """Sampling (the call's prefix buffers), RTC (the pullback) and a captured loop with a
    padded prefix equal each sample sampled with its real tokens alone; the capture takes
    a new observation's mask."""
    gen = torch.Generator().manual_seed(8)
    noise, prev = torch.randn(2, 2, H, D, generator=gen)
    tokens = torch.randn(2, 2, L, WIDTH, generator=gen)
    masks = _masks(gen, 2, L), _masks(gen, 2, L).flip(0)
    sampler = FlowSampler(head, num_steps=4)
    rtc = RTCGuidance(prev, 3, execution_horizon=6)
    with torch.no_grad():
        caches = [head.prefix_cache(tok, m) for tok, m in zip(tokens, masks)]
    captured = sampler.capture(noise, caches[0], rtc)
    for tok, mask, cache in zip(tokens, masks, caches):
        for guidance in (None, rtc):
            got = sampler.sample(noise, cache, guidance)
            want = []
            for b in range(2):
                one = None
                if guidance is not None:
                    one = RTCGuidance(prev[b : b + 1], 3, execution_horizon=6)
                want.append(sampler.sample(noise[b : b + 1], tok[b : b + 1, mask[b]], one))
            torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=2e-5)
        torch.testing.assert_close(captured(noise, cache), sampler.sample(noise, cache, rtc),
                                   rtol=0, atol=0)  # fmt: skip


def test_a_padded_prefix_with_triton_epilogues(head, monkeypatch):
    """With the Triton epilogues selected (interpreted here) and a padded prefix — the
    rotation's kernels reading per-sample tables, the softmax backward's padded keys at
    −inf — forward and input-VJP equal the torch path's to float32 rounding."""
    pytest.importorskip("triton", minversion=MIN_TRITON)
    gen = torch.Generator().manual_seed(10)
    x, u = torch.randn(2, 2, H, D, generator=gen)
    t = torch.rand(2, generator=gen)
    with torch.no_grad():
        cache = head.prefix_cache(torch.randn(2, L, WIDTH, generator=gen), _masks(gen, 2, L))
        results = {}
        for path in ("torch", "triton"):
            monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", path)
            out, pull = head.forward_with_vjp(x, t, cache)
            results[path] = out, pull(u)
    for want, got in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_a_padded_prefix_in_bf16(head):
    """bf16 weights and activations with a padded prefix: within the bf16 forward bound of
    tests/test_mixed_precision_heads.py (2e-2 relative L2) of float32 with the same rounded
    weights and each sample's real tokens alone."""
    ref = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    ref.load_state_dict({k: v.bfloat16().float() for k, v in head.state_dict().items()})
    low = make_head("flow-transformer", "small", horizon=H, action_dim=D).eval()
    low.load_state_dict(head.state_dict())
    low = low.bfloat16()
    gen = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, H, D, generator=gen), torch.rand(2, generator=gen)
    tokens = torch.randn(2, L, WIDTH, generator=gen)
    mask = _masks(gen, 2, L)
    with torch.no_grad():
        out = low(x, t, low.prefix_cache(tokens.bfloat16(), mask))
        want, _ = _per_sample(ref, x, t, tokens, mask)
    assert out.dtype == torch.float32
    assert float((out - want).norm() / want.norm()) <= 2e-2


def test_bad_masks_are_named(head):
    x, t = torch.randn(2, H, D), torch.rand(2)
    tokens = torch.randn(2, L, WIDTH)
    with torch.no_grad():
        cache = head.prefix_cache(tokens)
    for bad in (torch.ones(2, L), torch.ones(2, L - 1, dtype=torch.bool), [[True] * L] * 2):
        named = r"prefix mask must be a bool tensor \[B, L\] = \[2, 24\]"
        with pytest.raises(ValueError, match=named):
            head.prefix_cache(tokens, bad)
        with pytest.raises(ValueError, match=r"prefix mask must be a bool tensor"):
            head(x, t, cache._replace(mask=bad))
