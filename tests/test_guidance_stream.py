"""The guidance gradient beside the model on a second CUDA stream
(``ate_fast.sampling.guidance_stream``, ``ATE_FAST_GUIDANCE_STREAM``): when it is taken,
that a guidance reading ``x`` alone gets None for what it does not read, and on a GPU that
eager and captured samplers give the one-stream result."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from ate_fast.align import ActionVAE
from ate_fast.errors import InvalidArgumentError
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule, guidance_stream
from ate_fast.sampling import sampler as sampler_module
from ate_fast.steer import LatentGuidance

ENV = guidance_stream.ENV_VAR
B, H, D, DZ = 2, 8, 3, 4


def _guidance(arch: str = "mlp", mode: str = "direct", device: str = "cpu") -> LatentGuidance:
    torch.manual_seed(0)
    sizes = {"hidden_dims": (16,)} if arch == "mlp" else {"d_model": 32, "num_layers": 3}
    vae = ActionVAE(D, H, DZ, arch=arch, **sizes).to(device)
    return LatentGuidance(vae, torch.randn(DZ), scale=2.0, clamp=0.5, mode=mode)


def test_the_setting(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert guidance_stream.selected_path() == "same"  # the default until a GPU measures it
    monkeypatch.setenv(ENV, " Side ")
    assert guidance_stream.selected_path() == "side"
    monkeypatch.setenv(ENV, "parallel")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_GUIDANCE_STREAM: expected one of"):
        guidance_stream.selected_path()


def test_who_declares_reading_x_alone():
    assert _guidance(mode="direct").reads_x_only
    assert not _guidance(mode="tweedie").reads_x_only  # reads x0_hat
    assert not guidance_stream.reads_x_only(SimpleNamespace())  # undeclared: no

    class Blended(LatentGuidance):  # a gradient of its own may read x0_hat
        def gradient(self, x, x0_hat, dx0_dx):
            return super().gradient(x, x0_hat, dx0_dx) + 0 * x0_hat

    assert not Blended(_guidance().encoder, torch.zeros(DZ)).reads_x_only
    wrapped = _guidance()
    wrapped.gradient = mock.Mock(wraps=wrapped.gradient)
    assert not wrapped.reads_x_only
    assert not guidance_stream.reads_x_only(SimpleNamespace(reads_x_only="yes"))  # not a bool


def test_one_stream_wherever_the_side_one_cannot_run(monkeypatch):
    """On the CPU, unset, for a guidance that reads x0_hat, and without guidance: no side
    stream, so every sampler keeps its one-stream loop."""
    x = torch.zeros(B, H, D)
    monkeypatch.setenv(ENV, "side")
    assert guidance_stream.side_stream_for(_guidance(), x) is None  # the CPU
    assert guidance_stream.side_stream_for(None, x) is None
    meta = torch.empty(B, H, D, device="meta")
    assert guidance_stream.side_stream_for(_guidance(), meta) is None  # not CUDA either


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_direct_gradient_needs_no_model_output(arch):
    """What the side stream passes: x0_hat and dx0_dx None, for the guidance's gradient
    and for its per-call function alike — the same gradient as with them given."""
    guidance = _guidance(arch)
    x = torch.randn(B, H, D)
    want = guidance.gradient(x, torch.randn(B, H, D), torch.ones(B))
    torch.testing.assert_close(guidance.gradient(x, None, None), want, rtol=0, atol=0)
    per_call = guidance.call_gradient()
    for _ in range(2):  # the first call checks, the second takes what it prepared
        torch.testing.assert_close(per_call(x, None, None), want, rtol=0, atol=0)


def _samplers(head):
    schedule = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    return {
        "flow-euler": FlowSampler(head, 4),
        "flow-heun": FlowSampler(head, 3, method="heun"),
        "ddim": DiffusionSampler(head, schedule, "ddim", num_steps=4),
        "dpmsolver": DiffusionSampler(head, schedule, "dpmsolver++", num_steps=4),
    }


def _head(device):
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Linear(H * D + 1, 64), torch.nn.GELU(), torch.nn.Linear(64, H * D)
    ).to(device)

    def head(x, t, cond):
        inp = torch.cat([x.flatten(1), t.reshape(-1, 1).to(x.dtype)], dim=1)
        return net(inp).view_as(x)

    return head


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["mlp", "transformer"])
@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun", "ddim", "dpmsolver"])
def test_side_stream_equals_one_stream_on_cuda(monkeypatch, arch, sampler):
    """Eager sample() and the captured loop, with the gradient beside the model: the
    one-stream result (the same kernels on the same data), and the side path ran at every
    evaluation."""
    guidance = _guidance(arch, device="cuda")
    chosen = _samplers(_head("cuda"))[sampler]
    noise = torch.randn(B, H, D, device="cuda")
    monkeypatch.setenv(ENV, "same")
    with torch.no_grad():
        want = chosen.sample(noise, guidance=guidance).clone()
    monkeypatch.setenv(ENV, "side")
    beside = mock.Mock(wraps=guidance_stream.evaluate_beside)
    monkeypatch.setattr(sampler_module, "evaluate_beside", beside)
    with torch.no_grad():
        eager = chosen.sample(noise, guidance=guidance).clone()
        captured = chosen.capture(noise, guidance=guidance)
        replayed = captured(noise).clone()
        again = captured(noise).clone()
    assert beside.call_count >= 2  # eager evaluations, then the capture's
    for got in (eager, replayed, again):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _FakeStream:
    """Records the fork / join waits and which stream is current when work runs."""

    current = "main"

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


def _fake_cuda(monkeypatch, log):
    main, side = _FakeStream("main", log), _FakeStream("side", log)

    class _Scope:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.before, _FakeStream.current = _FakeStream.current, self.stream.name

        def __exit__(self, *exc):
            _FakeStream.current = self.before

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "stream", _Scope)
    return side


@pytest.mark.parametrize("fails", [None, "gradient", "model"])
def test_fork_gradient_model_join(monkeypatch, fails):
    """The order evaluate_beside issues (CUDA's stream calls faked on the CPU): the side
    stream waits for the current one, the gradient runs on the side stream with grad on
    and None for x0_hat / dx0_dx, the model on the current one, then the current stream
    waits for the side one — also when the gradient or the model raises."""
    log = []
    side = _fake_cuda(monkeypatch, log)
    x = torch.zeros(B, H, D)

    def gradient(point, x0_hat, dx0_dx):
        log.append(f"gradient on {_FakeStream.current}, grad {torch.is_grad_enabled()}, "
                   f"{x0_hat}, {dx0_dx}")  # fmt: skip
        if fails == "gradient":
            raise RuntimeError("gradient failed")
        return point + 1

    def model():
        log.append(f"model on {_FakeStream.current}")
        if fails == "model":
            raise RuntimeError("model failed")
        return x + 2

    order = ["side waits for main", "gradient on side, grad True, None, None",
             "model on main", "main waits for side"]  # fmt: skip
    with torch.no_grad():
        if fails:
            with pytest.raises(RuntimeError, match=f"{fails} failed"):
                guidance_stream.evaluate_beside(side, x, gradient, model)
            order = [e for e in order if not (fails == "gradient" and e.startswith("model"))]
            assert log == order
            return
        m, g = guidance_stream.evaluate_beside(side, x, gradient, model)
    assert log == order
    assert torch.equal(m, x + 2) and torch.equal(g, x + 1)


@pytest.mark.parametrize("sampler", ["flow-euler", "flow-heun", "ddim", "dpmsolver"])
def test_every_sampler_takes_the_side_path(monkeypatch, sampler):
    """Every sampler's loop reaches the side path through Run.evaluate (the streams faked
    on the CPU, the side stream forced): sample() and the captured loop equal the
    one-stream result exactly, with the gradient beside the model at every evaluation."""
    guidance = _guidance("transformer")
    chosen = _samplers(_head("cpu"))[sampler]
    noise = torch.randn(B, H, D)
    with torch.no_grad():
        want = chosen.sample(noise, guidance=guidance).clone()
    side = _fake_cuda(monkeypatch, [])
    monkeypatch.setattr(sampler_module, "side_stream_for", lambda guidance, x: side)
    beside = mock.Mock(wraps=guidance_stream.evaluate_beside)
    monkeypatch.setattr(sampler_module, "evaluate_beside", beside)
    with torch.no_grad():
        eager = chosen.sample(noise, guidance=guidance).clone()
        evaluations = beside.call_count
        replayed = chosen.capture(noise, guidance=guidance)(noise).clone()
    assert evaluations == {"flow-heun": 2 * 3 - 1}.get(sampler, 4)
    torch.testing.assert_close(eager, want, rtol=0, atol=0)
    torch.testing.assert_close(replayed, want, rtol=0, atol=0)
