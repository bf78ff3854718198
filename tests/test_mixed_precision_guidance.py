"""Mixed precision in the guidance: a bf16 / fp16 encoder with float32 chunks.

The encoder computes in its weights' dtype (the fused MLP kernel or the Transformer VJP,
not a fallback), the gradient comes back in the chunk's dtype, and the sampler state stays
float32. Tolerances (relative L2 to the float32 encoder's gradient, the same weights
rounded): bf16 ≤ 3e-2 (8 mantissa bits over two layers of 512), fp16 ≤ 5e-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from ate_fast import ActionVAE, FlowSampler, LatentGuidance, Steer, make_head
from ate_fast.steer.encoder import FrozenEncoder

H, D, DZ = 16, 8, 16
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
PATHS = {"mlp": "mlp_fused", "transformer": "transformer_vjp"}


def _pair(arch: str, dtype: torch.dtype) -> tuple[ActionVAE, ActionVAE]:
    torch.manual_seed(0)
    kwargs = (
        {"hidden_dims": (64, 64)}
        if arch == "mlp"
        else {"d_model": 32, "num_heads": 2, "ff_dim": 64, "num_layers": 3}
    )
    full = ActionVAE(D, H, DZ, arch, **kwargs)
    low = ActionVAE(D, H, DZ, arch, **kwargs)
    low.load_state_dict(full.state_dict())
    # the float32 reference uses the same (rounded) weights, so only the arithmetic differs
    full.load_state_dict({k: v.to(dtype).float() for k, v in full.state_dict().items()})
    return full, low.to(dtype)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("arch", ["mlp", "transformer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_encoder_float32_chunks(arch, dtype):
    full, low = _pair(arch, dtype)
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(3, H, D, generator=gen), torch.randn(DZ, generator=gen)
    guidance = LatentGuidance(low, target)
    assert guidance.encoder.weight_dtype == dtype
    assert guidance.encoder.path_for(x.to(dtype)) == PATHS[arch]  # the fast path, in dtype
    g = guidance.gradient(x, x, torch.ones(3))
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    ref = LatentGuidance(full, target).gradient(x, x, torch.ones(3))
    assert _relative(g, ref) <= TOLERANCE[dtype]
    # not vacuous: another target gives a different gradient
    other = LatentGuidance(low, -target).gradient(x, x, torch.ones(3))
    assert _relative(other, ref) > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_steer_with_low_precision_vae(dtype):
    full, low = _pair("mlp", dtype)
    gen = torch.Generator().manual_seed(2)
    v, x_t, a0, noise = torch.randn(4, 2, H, D, generator=gen)
    t = torch.rand(2, generator=gen)
    loss, diagnostics = Steer(low, clamp=10.0).flow_loss(v, x_t, a0, noise, t)
    ref, ref_diagnostics = Steer(full, clamp=10.0).flow_loss(v, x_t, a0, noise, t)
    assert loss.dtype == torch.float32
    assert _relative(loss, ref) <= TOLERANCE[dtype]
    assert _relative(diagnostics["grad_norm"], ref_diagnostics["grad_norm"]) <= TOLERANCE[dtype]


def test_guided_sampler_state_stays_float32():
    """Unclamped, the bf16 correction follows the float32 one. (With κ, early steps where
    c·g ≫ κ apply ≈ λκ·sign(g): elements of g near 0 flip sign under bf16 rounding, and the
    correction differs by ≈ 20 % though each gradient differs by < 1 %: docs/precision.md.)"""
    full, low = _pair("mlp", torch.bfloat16)
    torch.manual_seed(3)
    head = make_head("mlp", "small", horizon=H, action_dim=D).eval()
    noise, target = torch.randn(2, H, D), torch.randn(DZ)
    sampler = FlowSampler(head, num_steps=5)
    steps = []
    settings = {"scale": 0.5, "clamp": math.inf}
    out = sampler.sample(noise, guidance=LatentGuidance(low, target, **settings),
                         callback=lambda k, x: steps.append(x.dtype))  # fmt: skip
    ref = sampler.sample(noise, guidance=LatentGuidance(full, target, **settings))
    plain = sampler.sample(noise)
    assert out.dtype == torch.float32 and set(steps) == {torch.float32}
    assert _relative(out - plain, ref - plain) <= TOLERANCE[torch.bfloat16]
    captured = sampler.capture(noise, guidance=LatentGuidance(low, target, **settings))
    torch.testing.assert_close(captured(noise), out, rtol=0, atol=0)


def test_weight_dtype_of_mixed_or_parameterless_encoders():
    mixed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2).half())
    assert FrozenEncoder(mixed).weight_dtype is None
    assert FrozenEncoder(lambda a: a.flatten(1)).weight_dtype is None


def test_weight_dtype_follows_a_cast_after_construction():
    """weight_dtype is cached per call; a cast or an assign-load after the guidance was
    built is seen on the next call."""
    full, _ = _pair("mlp", torch.bfloat16)
    guidance = LatentGuidance(full, torch.zeros(DZ))
    x = torch.randn(2, H, D)
    assert guidance.encoder.weight_dtype == torch.float32
    full.to(torch.bfloat16)
    assert guidance.encoder.weight_dtype == torch.bfloat16
    assert guidance.gradient(x, x, torch.ones(2)).dtype == torch.float32
    halves = {k: v.half() for k, v in full.state_dict().items()}
    full.load_state_dict(halves, assign=True)
    assert guidance.encoder.weight_dtype == torch.float16
