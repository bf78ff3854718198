"""The reference heads read some layers' weights directly — the folded first-layer bias,
the split time MLP, residual adds as GEMM operands, the hand-written input-VJPs
(``ate_fast/models/direct_weights.py``). A layer wrapped by the user (LoRA, a quantization
wrapper) or hooked must still count: every head equals, in float64, the same head with the
adapter merged into its weights — forward, step features through the samplers, the
input-VJP and real-time chunking through it. The guidance encoders' fast paths (the fused
MLP kernel, the Transformer VJP) read weights as well: a hooked encoder takes autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ate_fast
from ate_fast.align import ActionVAE
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import make_head
from ate_fast.realtime import RTCGuidance
from ate_fast.steer import LatentGuidance

H, D = 16, 4
TOL = dict(rtol=1e-10, atol=1e-10)


class LoRALinear(nn.Module):
    """A low-rank adapter around a linear layer, as PEFT builds one: ``base(x) + B·A·x``."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        gen = torch.Generator().manual_seed(base.in_features + base.out_features)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen).double())
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, generator=gen).double())

    @property
    def weight(self) -> torch.Tensor:  # PEFT's wrapper exposes the base weight, as here
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def _adapted(kind: str, layers: list[str], **overrides) -> tuple[nn.Module, nn.Module]:
    """(head with LoRA on ``layers``, the same head with the adapters merged), float64."""
    torch.manual_seed(0)
    head = make_head(kind, "small", horizon=H, action_dim=D, **overrides).eval().double()
    merged = make_head(kind, "small", horizon=H, action_dim=D, **overrides).eval().double()
    merged.load_state_dict(head.state_dict())
    for name in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = head.get_submodule(parent_name) if parent_name else head
        lora = LoRALinear(getattr(parent, attr))
        setattr(parent, attr, lora)
        with torch.no_grad():
            merged.get_submodule(name).weight += lora.lora_b @ lora.lora_a
    return head, merged


CASES = {
    "mlp": ("mlp", ["input", "body.1"], dict(cond_dim=6)),
    "mlp-flatten": ("mlp", ["input"], dict(cond_dim=6, flatten=True)),
    "flow-transformer": (
        "flow-transformer", ["time_mlp_in", "blocks.0.q", "blocks.1.o"], dict(depth=2)
    ),
}  # fmt: skip


def _inputs(key: str) -> tuple[torch.Tensor, torch.Tensor, object]:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, H, D, generator=gen, dtype=torch.float64)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    cond = None if key == "flow-transformer" else torch.randn(2, 6, generator=gen).double()
    return noise, t, cond


@pytest.mark.parametrize("key", list(CASES))
def test_forward_step_features_and_vjp_see_the_adapter(key):
    kind, layers, overrides = CASES[key]
    head, merged = _adapted(kind, layers, **overrides)
    noise, t, cond = _inputs(key)
    with torch.no_grad():
        torch.testing.assert_close(head(noise, t, cond), merged(noise, t, cond), **TOL)
        for method in ("euler", "heun"):  # the samplers use the heads' step features
            want = ate_fast.FlowSampler(merged, num_steps=4, method=method).sample(noise, cond)
            got = ate_fast.FlowSampler(head, num_steps=4, method=method).sample(noise, cond)
            torch.testing.assert_close(got, want, **TOL)
    u = torch.randn(2, H, D, dtype=torch.float64)
    out, pullback = head.forward_with_vjp(noise, t, cond)
    out_ref, pullback_ref = merged.forward_with_vjp(noise, t, cond)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(pullback(u), pullback_ref(u), **TOL)
    torch.testing.assert_close(pullback(u), pullback_ref(u), **TOL)  # callable again
    prev = torch.randn(2, H, D, dtype=torch.float64)
    rtc = RTCGuidance(prev, 2, execution_horizon=5)
    with torch.no_grad():
        got = ate_fast.FlowSampler(head, num_steps=4).sample(noise, cond, guidance=rtc)
        want = ate_fast.FlowSampler(merged, num_steps=4).sample(noise, cond, guidance=rtc)
    torch.testing.assert_close(got, want, **TOL)


def test_a_hook_on_a_directly_read_layer_takes_effect():
    """A forward hook that changes the time MLP's first layer's output: the forward, the
    samplers and the input-VJP all see it (the head equals its hooked forward by autograd)."""
    _, head = _adapted("flow-transformer", [], depth=2)
    noise, t, _ = _inputs("flow-transformer")
    with torch.no_grad():
        before = head(noise, t)
    handle = head.time_mlp_in.register_forward_hook(lambda m, i, out: 1.5 * out)
    try:
        with torch.no_grad():
            after = head(noise, t)
            assert (after - before).abs().max() > 1e-3
            sampled = ate_fast.FlowSampler(head, num_steps=3).sample(noise)
        x = noise.clone().requires_grad_(True)
        u = torch.randn_like(noise)
        (want,) = torch.autograd.grad(head(x, t), x, u)
        _, pullback = head.forward_with_vjp(noise, t)
        torch.testing.assert_close(pullback(u), want, **TOL)
    finally:
        handle.remove()
    with torch.no_grad():
        assert (ate_fast.FlowSampler(head, num_steps=3).sample(noise) - sampled).abs().max() > 1e-3


def test_inference_mode_with_a_wrapped_head_says_why():
    head, _ = _adapted("flow-transformer", ["blocks.0.q"], depth=2)
    noise, t, _ = _inputs("flow-transformer")
    with torch.inference_mode(), pytest.raises(InvalidArgumentError, match="wrapped or hooked"):
        head.forward_with_vjp(noise, t)


# -- the guidance encoders: the fused MLP kernel and the Transformer VJP read weights too --
DZ = 8


def _autograd_latent_gradient(vae, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∇ₓ of −(1/d_z)‖μ(x) − z*‖² per sample, by autograd through the encoder as called."""
    leaf = x.detach().clone().requires_grad_(True)
    mu = vae.encode(leaf)[0]
    (grad,) = torch.autograd.grad(-((mu - target) ** 2).sum() / DZ, leaf)
    return grad


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
def test_a_hooked_encoder_takes_the_autograd_path(arch):
    """A forward hook on an encoder layer (here: scaling linear outputs) changes what the
    encoder computes; the fused kernel / hand VJP would skip it, so the guidance takes
    autograd — hooked before the guidance is built, or after its calls were prepared."""
    torch.manual_seed(0)
    extra = dict(hidden_dims=(16, 8)) if arch == "mlp" else dict(d_model=32, num_layers=3)
    vae = ActionVAE(D, H, latent_dim=DZ, arch=arch, **extra).double()
    layer = vae.encoder.layers[0] if arch == "mlp" else vae.encoder.blocks.middle_block.linear1
    target = torch.randn(DZ, dtype=torch.float64)
    x = torch.randn(2, H, D, dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)
    guidance = LatentGuidance(vae, target, scale=1.0)
    fast = guidance.encoder.gradient_path
    assert fast != "autograd"
    for _ in range(2):  # the second call is the prepared one (MLP, CPU)
        torch.testing.assert_close(
            guidance.gradient(x, x, one), _autograd_latent_gradient(vae, x, target), **TOL
        )
    handle = layer.register_forward_hook(lambda m, i, out: 1.3 * out)
    try:
        want = _autograd_latent_gradient(vae, x, target)
        if arch == "mlp":  # the prepared call re-checks the structure every step
            torch.testing.assert_close(guidance.gradient(x, x, one), want, **TOL)
        rebuilt = LatentGuidance(vae, target, scale=1.0)
        assert rebuilt.encoder.gradient_path == "autograd"
        torch.testing.assert_close(rebuilt.gradient(x, x, one), want, **TOL)
    finally:
        handle.remove()
    assert LatentGuidance(vae, target, scale=1.0).encoder.gradient_path == fast


def test_rtc_export_of_an_adapted_head(tmp_path):
    """With adapters the input-VJP is autograd's, which torch.export cannot trace: the paper's
    RTC export says so (merge first); LeRobot's RTC (no VJP) exports the adapted head and
    ONNX Runtime computes what sample() does."""
    pytest.importorskip("onnxruntime")
    from ate_fast.export import GuidanceExportError, OnnxRuntimeSampler, relative_error, to_onnx

    head, _ = _adapted("mlp", ["input", "body.1"], cond_dim=6)
    head.float()
    gen = torch.Generator().manual_seed(2)
    noise, prev = torch.randn(2, 1, H, D, generator=gen)
    cond = torch.randn(1, 6, generator=gen)
    sampler = ate_fast.FlowSampler(head, num_steps=3)
    with pytest.raises(GuidanceExportError, match="merge the adapters"):
        to_onnx(
            sampler, tmp_path / "vjp.onnx", noise, cond, RTCGuidance(prev, 1, execution_horizon=5)
        )
    rtc = RTCGuidance(prev, 1, execution_horizon=5, jacobian=False)
    path = to_onnx(sampler, tmp_path / "rtc.onnx", noise, cond, rtc)
    with torch.no_grad():
        want = sampler.sample(noise, cond, guidance=rtc)
    assert relative_error(OnnxRuntimeSampler(path).sample(noise, cond, guidance=rtc), want) < 1e-4
