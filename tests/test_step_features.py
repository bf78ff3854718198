"""Step features (ate_fast.sampling.step_features): every reference head splits its forward
into what (t, cond) alone decide and the rest; the samplers compute the former once per
call for all steps. Checked: the split is the forward (bit for bit at N = 1, float64
rounding at N > 1), sample()/capture() compute features once per call and per table and
see weights and cond changed between calls, the detection rules, and bad input."""

from __future__ import annotations

import pytest
import torch

from ate_fast import DiffusionSampler, FlowSampler, NoiseSchedule, RTCGuidance, make_head
from ate_fast.sampling.step_features import step_features_of

B = 2
# (name, config, overrides, cond: "vector" [B, cond_dim], "tokens" [B, L, width], or None)
HEADS = {
    "mlp": ("mlp", "small", {"horizon": 8, "action_dim": 3, "cond_dim": 5}, "vector"),
    "mlp-flat": ("mlp", "flat", {"horizon": 8, "action_dim": 3, "hidden": 32}, None),
    "flow-transformer": (
        "flow-transformer", "small",
        {"horizon": 8, "action_dim": 3, "width": 32, "depth": 2, "mlp_dim": 64, "head_dim": 8},
        None,
    ),
    "flow-transformer-tokens": (
        "flow-transformer", "small",
        {"horizon": 8, "action_dim": 3, "width": 32, "depth": 2, "mlp_dim": 64, "head_dim": 8},
        "tokens",
    ),
    "unet1d": ("unet1d", "small", {"horizon": 8, "action_dim": 3, "cond_dim": 6}, "vector"),
}  # fmt: skip


def _head(key: str, dtype=torch.float64):
    name, config, overrides, _ = HEADS[key]
    torch.manual_seed(0)
    return make_head(name, config, **overrides).to(dtype).eval().requires_grad_(False)


def _inputs(key: str, head, dtype=torch.float64, seed: int = 1):
    cfg = head.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.horizon, cfg.action_dim, generator=gen, dtype=dtype)
    kind = HEADS[key][3]
    if kind == "vector":
        cond = torch.randn(B, cfg.cond_dim, generator=gen, dtype=dtype)
    elif kind == "tokens":
        cond = torch.randn(B, 5, cfg.width, generator=gen, dtype=dtype)
    else:
        cond = None
    scale = 1000.0 if HEADS[key][0] == "unet1d" else 1.0
    t = torch.rand(4, B, generator=gen, dtype=dtype) * scale  # N = 4 times
    return x, t, cond


@pytest.mark.parametrize("key", list(HEADS))
def test_split_is_the_forward(key):
    head = _head(key)
    x, t, cond = _inputs(key, head)
    with torch.no_grad():
        for k in range(t.shape[0]):  # one time: the same ops as forward, bit for bit
            one = head.step_features(x, t[k : k + 1], cond)
            assert len(one) == 1
            assert torch.equal(head.forward_features(x, one[0]), head(x, t[k], cond))
        batched = head.step_features(x, t, cond)  # N times in one pass: rounding only
        assert len(batched) == t.shape[0]
        for k, features in enumerate(batched):
            out = head.forward_features(x, features)
            torch.testing.assert_close(out, head(x, t[k], cond), rtol=1e-12, atol=1e-12)
        # the features do depend on the time (and the output on x)
        a, b = (head.forward_features(x, f) for f in batched[:2])
        assert not torch.allclose(a, b)


@pytest.mark.parametrize("key", ["mlp", "flow-transformer-tokens"])
def test_vjp_split_is_the_vjp(key):
    head = _head(key)
    x, t, cond = _inputs(key, head)
    u = torch.randn_like(x)
    with torch.no_grad():
        features = head.step_features(x, t[:1], cond)[0]
        out_f, pull_f = head.forward_with_vjp_features(x, features)
        out, pull = head.forward_with_vjp(x, t[0], cond)
    assert torch.equal(out_f, out) and torch.equal(pull_f(u), pull(u))


@pytest.mark.parametrize("key", list(HEADS))
def test_vmap_over_a_calls_features(key):
    """``torch.func.vmap`` over samples x with one call's multi-step features: the flow
    transformer's in-place writes into the call's prefix buffers (and oneDNN's GEMM) have
    no batching rule, so its fast paths must step aside under a transform (they did not:
    "Batching rule not implemented for aten::addcmul.out")."""
    head = _head(key)
    x, t, cond = _inputs(key, head)
    xs = torch.stack([x, torch.randn_like(x), torch.randn_like(x)])  # [V, B, H, D]
    features = head.step_features(x, t, cond)
    assert len(features) > 1
    for k in (0, 2):
        out = torch.func.vmap(lambda v, f=features[k]: head.forward_features(v, f))(xs)
        ref = torch.stack([head(v, t[k], cond) for v in xs])
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # and a plain forward with the same features afterwards still writes and reads its rows
    torch.testing.assert_close(
        head.forward_features(xs[1], features[1]), head(xs[1], t[1], cond), rtol=1e-12, atol=1e-12
    )


def _count_calls(head):
    """Count the sampler's calls of the split (patched on the instance: the class, so the
    detection, is unchanged; ``head(...)`` itself does not go through these)."""
    calls = {"step_features": 0, "forward_features": 0, "rows": []}
    step_features, forward_features = head.step_features, head.forward_features

    def counted_step(x, t, cond):
        calls["step_features"] += 1
        calls["rows"].append(t.shape[0])
        return step_features(x, t, cond)

    def counted_forward(x, features):
        calls["forward_features"] += 1
        return forward_features(x, features)

    head.step_features, head.forward_features = counted_step, counted_forward
    return calls


@pytest.mark.parametrize(
    "make_sampler,tables,evaluations",
    [
        (lambda m: FlowSampler(m, 5), 1, 5),
        (lambda m: FlowSampler(m, 4, method="heun"), 2, 7),
        (lambda m: DiffusionSampler(m, NoiseSchedule(), "ddim", 6), 1, 6),
        (lambda m: DiffusionSampler(m, NoiseSchedule(), "dpmsolver++", 4), 1, 4),
    ],
    ids=["euler", "heun", "ddim", "dpmsolver++"],
)
def test_sample_computes_features_once_per_call(make_sampler, tables, evaluations):
    key = "unet1d"
    head = _head(key)
    x, _, cond = _inputs(key, head)
    calls = _count_calls(head)
    sampler = make_sampler(head)
    with torch.no_grad():
        out = sampler.sample(x, cond)
        assert calls["step_features"] == tables
        assert calls["forward_features"] == evaluations
        assert set(calls["rows"]) == {sampler.num_steps}  # every step's time in one pass
        # the same function as the sampler calling the head step by step
        plain = make_sampler(lambda x_, t_, c_: head(x_, t_, c_))
        torch.testing.assert_close(out, plain.sample(x, cond), rtol=1e-10, atol=1e-10)
        captured = sampler.capture(x, cond)
        assert calls["step_features"] == tables  # capturing on the CPU runs nothing yet
        for n in (2, 3):
            torch.testing.assert_close(captured(x, cond), out, rtol=0, atol=0)
            assert calls["step_features"] == n * tables  # once per call and table


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", ["mlp", "unet1d", "flow-transformer-tokens"])
def test_capture_sees_weights_and_cond_changed_between_calls(key, device, request):
    if device == "cuda":  # features computed inside the CUDA graph, on every replay
        request.getfixturevalue("no_tf32")
    head = _head(key).to(device)
    x, _, cond = (None if t is None else t.to(device) for t in _inputs(key, head))
    # the CPU replay runs the very kernels sample() runs; a CUDA graph may not (float64)
    same = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-10, "atol": 1e-10}
    make = (lambda m: FlowSampler(m, 4)) if HEADS[key][0] != "unet1d" else (
        lambda m: DiffusionSampler(m, NoiseSchedule(), "ddim", 4)
    )  # fmt: skip
    sampler = make(head)
    with torch.no_grad():
        captured = sampler.capture(x, cond, check_finite=False)
        torch.testing.assert_close(captured(x, cond), sampler.sample(x, cond), **same)
        for p in head.parameters():  # an optimizer step, in place
            p.mul_(1.01).add_(0.01)
        fresh = sampler.sample(x, cond)
        torch.testing.assert_close(captured(x, cond), fresh, **same)
        if cond is not None:
            other = torch.randn_like(cond)
            torch.testing.assert_close(captured(x, other).clone(), sampler.sample(x, other), **same)
            assert not torch.allclose(sampler.sample(x, other), fresh)


def test_detection():
    head = _head("mlp")
    assert step_features_of(head) is head
    assert step_features_of(head.forward) is head
    assert step_features_of(lambda x, t, c: head(x, t, c)) is None  # an opaque callable

    class Overridden(type(head)):
        def forward(self, x, t, cond=None):  # another function: its features would lie
            return super().forward(x, t, cond) * 2

    other = Overridden(head.config)
    assert step_features_of(other) is None
    handle = head.register_forward_hook(lambda *args: None)
    assert step_features_of(head) is None  # calling forward_features would skip the hook
    handle.remove()
    assert step_features_of(head) is head
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert step_features_of(head) is None  # a module-wide hook too
    finally:
        handle.remove()
    assert step_features_of(head) is head


def test_hooked_head_still_samples_through_forward():
    head = _head("mlp")
    x, _, cond = _inputs("mlp", head)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        FlowSampler(head, 3).sample(x, cond)
    assert len(seen) == 3


def test_rtc_reads_the_same_features():
    head = _head("flow-transformer-tokens")
    x, _, cond = _inputs("flow-transformer-tokens", head)
    calls = _count_calls(head)
    prev = torch.randn_like(x)
    sampler = FlowSampler(head, 4)
    with torch.no_grad():
        guidance = RTCGuidance(prev, 0, execution_horizon=4, prefix_schedule="zeros")
        guided = sampler.sample(x, cond, guidance=guidance)
        unguided = sampler.sample(x, cond)
    assert calls["step_features"] == 2
    assert torch.equal(guided, unguided)  # zero weights: the same features, the same result


@pytest.mark.parametrize("key", list(HEADS))
def test_bad_input(key):
    head = _head(key)
    x, t, cond = _inputs(key, head)
    with pytest.raises(ValueError, match=r"t must have shape \[N, B\]"):
        head.step_features(x, t[0], cond)
    with pytest.raises(ValueError, match="x must have shape"):
        head.step_features(x[:, :-1], t, cond)
    if cond is not None:
        with pytest.raises(ValueError, match="cond"):
            head.step_features(x, t, cond[:1])


def test_mlp_features_shape_is_checked():
    head = _head("mlp")
    x, t, cond = _inputs("mlp", head)
    features = head.step_features(x, t, cond)[0]
    assert features.shape == (B, head.config.horizon, head.config.hidden)  # folded bias
    with pytest.raises(ValueError, match=r"features must have shape \[2, 256\] or \[2, 8, 256\]"):
        head.forward_features(x, features[:1])


def test_mlp_context_rows_above_the_folding_bound(monkeypatch):
    """Above FOLDED_BIAS_ELEMENTS a step gets the context row [B, hidden] (the per-step
    bias would be N·B·H·hidden elements): the same function, other rounding."""
    from ate_fast.models import mlp_head

    head = _head("mlp")
    x, t, cond = _inputs("mlp", head)
    with torch.no_grad():
        folded = [head.forward_features(x, f) for f in head.step_features(x, t, cond)]
        monkeypatch.setattr(mlp_head, "FOLDED_BIAS_ELEMENTS", 0)
        rows = head.step_features(x, t, cond)
        assert rows[0].shape == (B, head.config.hidden)
        for k, features in enumerate(rows):
            out = head.forward_features(x, features)
            torch.testing.assert_close(out, folded[k], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(out, head(x, t[k], cond), rtol=1e-12, atol=1e-12)
