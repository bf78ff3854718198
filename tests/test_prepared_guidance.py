"""LatentGuidance's prepared fused call (ate_fast.ops.mlp_guidance.prepared): after one
call on the fused MLP path, later calls skip the public op's validation and dispatch —
with the same result — and every change that the prepared call cannot see sends the
call back through the public op: another sample layout, weights replaced or recast, a
new target or mask, a forced backend, autocast. Within one sampler call
(LatentGuidance.call_gradient) the re-check runs at the first evaluation only: a new
target and another sample layout are still seen at once, user code in a step callback
gets every evaluation checked, and every change between calls is seen."""

from __future__ import annotations

import pytest
import torch

import ate_fast
from ate_fast.align import ActionVAE
from ate_fast.ops import mlp_encoder_parts, mlp_guidance_reference
from ate_fast.ops.mlp_guidance import dispatch
from ate_fast.steer import LatentGuidance

B, H, D, DZ = 2, 6, 3, 4


@pytest.fixture
def full_calls(monkeypatch):
    """How many calls went through the public op (its validation)."""
    calls = []
    validate = dispatch.validate

    def counted(*args):
        calls.append(1)
        return validate(*args)

    monkeypatch.setattr(dispatch, "validate", counted)
    return calls


def _guidance(dtype=torch.float64, mask=None):
    torch.manual_seed(0)
    vae = ActionVAE(D, H, latent_dim=DZ, arch="mlp", hidden_dims=(16, 8)).to(dtype)
    target = torch.randn(DZ, dtype=dtype)
    return LatentGuidance(vae, target, scale=2.0, clamp=0.1, mask=mask)


def _reference(guidance, x):
    weights, biases, activation = mlp_encoder_parts(guidance.encoder._mlp)
    target = guidance.target.to(x.dtype)
    mask = guidance.encoder.mask
    g, _ = mlp_guidance_reference(x, weights, biases, activation, target, None, mask, None, 1 / DZ)
    return g


def _x(dtype=torch.float64, batch=B, seed=1):
    return torch.randn(batch, H, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_later_calls_are_prepared_and_equal(full_calls, dtype):
    guidance = _guidance(dtype)
    x, one = _x(dtype), torch.ones(B, dtype=dtype)
    first = guidance.gradient(x, x, one)
    assert len(full_calls) == 1
    for seed in (2, 3):  # new values in the same layout: the prepared call
        y = _x(dtype, seed=seed)
        got = guidance.gradient(y, y, one)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, _reference(guidance, y), rtol=tol, atol=tol)
    assert len(full_calls) == 1
    assert torch.equal(guidance.gradient(x, x, one), first)  # bit for bit the public op's


def test_weights_updated_in_place_are_seen(full_calls):
    guidance = _guidance()
    x, one = _x(), torch.ones(B, dtype=torch.float64)
    guidance.gradient(x, x, one)
    with torch.no_grad():
        for p in guidance.encoder._mlp.parameters():
            p.mul_(1.1)
    got = guidance.gradient(x, x, one)
    assert len(full_calls) == 1  # same storage: still prepared, reading the new values
    torch.testing.assert_close(got, _reference(guidance, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "change",
    ["replace weights", "recast", "set_target", "batch", "non-contiguous", "backend", "mask"],
)
def test_changes_go_back_through_the_public_op(full_calls, monkeypatch, change):
    guidance = _guidance()
    x, one = _x(), torch.ones(B, dtype=torch.float64)
    guidance.gradient(x, x, one)
    assert len(full_calls) == 1
    layer = guidance.encoder._mlp.layers[0]
    if change == "replace weights":  # e.g. load_state_dict(..., assign=True)
        layer.weight = torch.nn.Parameter(layer.weight.detach() * 2, requires_grad=False)
    elif change == "recast":  # the VAE cast to float32: the gradient stays float64
        guidance.encoder.modules[0].to(torch.float32)
    elif change == "set_target":
        guidance.set_target(torch.randn(DZ, dtype=torch.float64))
    elif change == "batch":
        x, one = _x(batch=B + 1), torch.ones(B + 1, dtype=torch.float64)
    elif change == "non-contiguous":  # the same values, a transposed layout
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous()
    elif change == "backend":
        monkeypatch.setenv("ATE_FAST_BACKEND", "ref")
    elif change == "mask":
        guidance.encoder.mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    got = guidance.gradient(x, x, one)
    assert len(full_calls) == 2, "the change was not noticed"
    if change == "recast":
        assert got.dtype == torch.float64
        x32 = x.to(torch.float32)
        torch.testing.assert_close(got, _reference(guidance, x32).double(), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got, _reference(guidance, x), rtol=1e-12, atol=1e-12)


def test_autocast_takes_the_autograd_path(full_calls):
    guidance = _guidance(torch.float32)
    x, one = _x(torch.float32), torch.ones(B)
    guidance.gradient(x, x, one)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = guidance.gradient(x, x, one)
    assert len(full_calls) == 1  # autocast: autograd through the encoder, not the op
    torch.testing.assert_close(got, _reference(guidance, x), rtol=0.05, atol=2e-3)


def test_captured_guided_loop_uses_it(full_calls):
    torch.manual_seed(0)
    head = ate_fast.make_head("mlp", "small", horizon=H, action_dim=D).double().eval()
    guidance = _guidance()
    sampler = ate_fast.FlowSampler(head, 5)
    noise = _x()
    with torch.no_grad():
        expected = sampler.sample(noise, guidance=guidance).clone()
        calls = len(full_calls)
        assert calls == 1  # the first step prepared it; the other four and later calls reuse
        captured = sampler.capture(noise, guidance=guidance)
        assert torch.equal(captured(noise), expected)
        assert torch.equal(captured(noise), expected)
    assert len(full_calls) == calls


# -- one check per sampler call (LatentGuidance.call_gradient) ----------------------------
class _PerStepGuidance(LatentGuidance):
    """The same guidance without ``call_gradient``: every evaluation re-checks."""

    call_gradient = None


def _both(mode="direct", mask=None):
    """The guidance and its per-step twin, with the same weights and target."""
    guidance = _guidance(mask=mask)
    guidance.mode = mode
    twin = _PerStepGuidance(_guidance(mask=mask).encoder.modules[0], guidance.target, mode=mode)
    twin.encoder.mask = mask
    return guidance, twin


@pytest.fixture
def re_checks(monkeypatch):
    """How many times the prepared call's full re-check ran."""
    from ate_fast.steer import latent_guidance

    calls = []
    accepts = latent_guidance._PreparedGradient.accepts

    def counted(self, *args):
        calls.append(1)
        return accepts(self, *args)

    monkeypatch.setattr(latent_guidance._PreparedGradient, "accepts", counted)
    return calls


def _samplers(head):
    schedule = ate_fast.NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    return {
        "euler": ate_fast.FlowSampler(head, 5),
        "heun": ate_fast.FlowSampler(head, 4, method="heun"),
        "ddim": ate_fast.DiffusionSampler(head, schedule, num_steps=5),
    }


def _head():
    torch.manual_seed(0)
    return ate_fast.make_head("mlp", "small", horizon=H, action_dim=D).double().eval()


@pytest.mark.parametrize("mode", ["direct", "tweedie"])
@pytest.mark.parametrize("name", ["euler", "heun", "ddim"])
def test_a_sampler_call_checks_once_with_the_same_result(re_checks, mode, name):
    guidance, twin = _both(mode)
    sampler = _samplers(_head())[name]
    noise = _x()
    with torch.no_grad():
        expected = sampler.sample(noise, guidance=twin)
        first = sampler.sample(noise, guidance=guidance)  # builds the prepared call
        re_checks.clear()
        again = sampler.sample(noise, guidance=guidance)
        assert len(re_checks) == 1  # the call's first evaluation only
        captured = sampler.capture(noise, guidance=guidance)
        re_checks.clear()
        replayed = captured(noise).clone()
        assert len(re_checks) == 1
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert torch.equal(replayed, expected)


@pytest.mark.parametrize("change", ["replace weights", "set_target", "mask", "backend"])
def test_changes_between_calls_are_seen(full_calls, monkeypatch, change):
    mask = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    guidance, twin = _both(mask=mask)
    sampler = ate_fast.FlowSampler(_head(), 5)
    noise = _x()
    with torch.no_grad():
        captured = sampler.capture(noise, guidance=guidance)
        captured(noise)
        calls = len(full_calls)
        new_target = guidance.target * 3
        for g in (guidance, twin):
            layer = g.encoder._mlp.layers[0]
            if change == "replace weights":  # e.g. load_state_dict(..., assign=True)
                layer.weight = torch.nn.Parameter(layer.weight.detach() * 2, requires_grad=False)
            elif change == "set_target":
                g.set_target(new_target)
            elif change == "mask":
                g.encoder.mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
        if change == "backend":
            monkeypatch.setenv("ATE_FAST_BACKEND", "ref")
        got = captured(noise).clone()
        expected = sampler.sample(noise, guidance=twin)
    assert len(full_calls) > calls, "the change was not noticed"
    assert torch.equal(got, expected)


def test_set_target_within_a_call_is_seen():
    guidance, twin = _both()
    gradient = guidance.call_gradient()
    x, one = _x(), torch.ones(B, dtype=torch.float64)
    gradient(x, x, one)
    gradient(x, x, one)  # the prepared call, unchecked
    new = torch.randn(DZ, dtype=torch.float64)
    guidance.set_target(new)
    twin.set_target(new)
    assert torch.equal(gradient(x, x, one), twin.gradient(x, x, one))
    torch.testing.assert_close(gradient(x, x, one), _reference(guidance, x), rtol=1e-12, atol=0)


def test_another_layout_within_a_call_takes_the_checked_path():
    guidance, twin = _both()
    gradient = guidance.call_gradient()
    x, one = _x(), torch.ones(B, dtype=torch.float64)
    gradient(x, x, one)
    wide, one3 = _x(batch=B + 1), torch.ones(B + 1, dtype=torch.float64)
    assert torch.equal(gradient(wide, wide, one3), twin.gradient(wide, wide, one3))
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(gradient(strided, strided, one), twin.gradient(strided, strided, one))


def test_a_step_callback_gets_every_evaluation_checked():
    """User code between evaluations (here: weights replaced at step 2, as a
    load_state_dict(assign=True) would) is seen from the next evaluation on."""
    guidance, twin = _both()
    sampler = ate_fast.FlowSampler(_head(), 5)
    noise = _x()

    def replace_at_2(g):
        def callback(k, x):
            if k == 2:
                layer = g.encoder._mlp.layers[1]
                layer.weight = torch.nn.Parameter(layer.weight.detach() * 3, requires_grad=False)

        return callback

    with torch.no_grad():
        untouched = sampler.sample(noise, guidance=_both()[0])
        sampler.sample(noise, guidance=guidance)  # prepared
        got = sampler.sample(noise, guidance=guidance, callback=replace_at_2(guidance))
        expected = sampler.sample(noise, guidance=twin, callback=replace_at_2(twin))
    assert torch.equal(got, expected)
    assert not torch.allclose(got, untouched)


@pytest.mark.parametrize("method", ["gradient", "latent_gradient"])
def test_a_subclass_overriding_the_gradient_runs_it_every_evaluation(method):
    """A subclass's own gradient (here: doubled) is never bypassed by the per-call path."""

    def doubled(base):
        def method_(self, *args):
            return 2 * base(self, *args)

        return method_

    class Doubled(LatentGuidance):
        pass

    class DoubledPerStep(_PerStepGuidance):
        pass

    setattr(Doubled, method, doubled(getattr(LatentGuidance, method)))
    setattr(DoubledPerStep, method, doubled(getattr(LatentGuidance, method)))
    guidance, twin = _both()
    mine = Doubled(guidance.encoder.modules[0], guidance.target)
    theirs = DoubledPerStep(twin.encoder.modules[0], twin.target)
    sampler = ate_fast.FlowSampler(_head(), 5)
    noise = _x()
    with torch.no_grad():
        plain = sampler.sample(noise, guidance=guidance)
        sampler.sample(noise, guidance=mine)
        got = sampler.sample(noise, guidance=mine)
        expected = sampler.sample(noise, guidance=theirs)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain)


def test_a_gradient_replaced_on_the_instance_runs_every_evaluation():
    guidance = _both()[0]
    calls = []
    own = guidance.latent_gradient

    def counted(point):
        calls.append(1)
        return own(point)

    guidance.latent_gradient = counted
    with torch.no_grad():
        ate_fast.FlowSampler(_head(), 5).sample(_x(), guidance=guidance)
    assert len(calls) == 5


class _CountingGuidance:
    """A guidance of its own with ``call_gradient``: counts the asks and the calls."""

    def __init__(self, mode):
        self.scale, self.clamp, self.mode = 1.0, 0.1, mode
        self.asks, self.per_call, self.per_step = 0, 0, 0

    def gradient(self, x, x0_hat, dx0_dx):
        self.per_step += 1
        return 0.1 * x0_hat

    def call_gradient(self):
        self.asks += 1

        def gradient(x, x0_hat, dx0_dx):
            self.per_call += 1
            return 0.1 * x0_hat

        return gradient


@pytest.mark.parametrize("mode", ["direct", "tweedie", "policy_vjp"])
def test_the_samplers_ask_any_guidance_once_per_call(mode):
    """The protocol for a guidance of one's own, every mode: asked once per call, its
    function called at every evaluation; with a step callback, ``gradient`` instead."""
    sampler = ate_fast.FlowSampler(_head(), 4)
    noise = _x()
    guidance = _CountingGuidance(mode)
    with torch.no_grad():
        sampler.sample(noise, guidance=guidance)
        sampler.sample(noise, guidance=guidance)
        assert (guidance.asks, guidance.per_call, guidance.per_step) == (2, 8, 0)
        sampler.sample(noise, guidance=guidance, callback=lambda k, x: None)
    assert (guidance.asks, guidance.per_call, guidance.per_step) == (2, 8, 4)
