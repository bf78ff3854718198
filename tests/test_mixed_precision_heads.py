"""Mixed precision in the reference heads: weights and activations in bf16 / fp16, the
sampler state and its update in float32 (as openpi integrates).

Tolerances: relative L2 against the float32 head with the same rounded weights (so only
the arithmetic differs), measured on this project's CPU for H = 48, D = 8, 10 steps —
forward: bf16 ≤ 1.2e-2, fp16 ≤ 1.4e-3; sampled actions (every method): bf16 ≤ 4e-3,
fp16 ≤ 5e-4 (the integration averages the per-step rounding). Bounds are ≈ 2× those.
"""

from __future__ import annotations

import pytest
import torch

from ate_fast import DiffusionSampler, FlowSampler, NoiseSchedule, RTCGuidance, make_head

H, D, COND = 48, 8, 32
FORWARD = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
SAMPLED = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
HEADS = ["mlp", "flow-transformer", "unet1d"]


def _heads(kind: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(float32 head with the weights rounded to dtype, the same head in dtype)."""
    torch.manual_seed(0)
    head = make_head(kind, "small", horizon=H, action_dim=D).eval()
    rounded = {k: v.to(dtype).float() for k, v in head.state_dict().items()}
    low = make_head(kind, "small", horizon=H, action_dim=D).eval()
    low.load_state_dict(head.state_dict())
    head.load_state_dict(rounded)
    return head, low.to(dtype)


def _cond(kind: str) -> torch.Tensor | None:
    return (
        torch.randn(2, COND, generator=torch.Generator().manual_seed(5))
        if kind == "unet1d"
        else None
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_float32_in_and_out(kind, dtype):
    ref, low = _heads(kind, dtype)
    x, t, cond = torch.randn(2, H, D), torch.rand(2), _cond(kind)
    with torch.no_grad():
        out = low(x, t, cond)
        assert out.dtype == torch.float32
        assert _relative(out, ref(x, t, cond)) <= FORWARD[dtype]
        if cond is not None:  # cond may also come in the head's dtype
            torch.testing.assert_close(low(x, t, cond.to(dtype)), out, rtol=0, atol=0)
            with pytest.raises(ValueError, match=r"cond must have x's dtype or the head's"):
                low(x, t, cond.double())


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_sampler_method(kind, dtype):
    ref, low = _heads(kind, dtype)
    noise, cond = torch.randn(2, H, D), _cond(kind)
    schedule = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
    samplers = [(FlowSampler, {"method": m}) for m in ("euler", "heun")]
    samplers += [(DiffusionSampler, {"schedule": schedule, "method": m})
                 for m in ("ddpm", "ddim", "dpmsolver++")]  # fmt: skip
    with torch.no_grad():
        for cls, kwargs in samplers:
            states: list[torch.dtype] = []
            out = cls(low, num_steps=10, **kwargs).sample(
                noise, cond, generator=torch.Generator().manual_seed(0),
                callback=lambda k, x, seen=states: seen.append(x.dtype),
            )  # fmt: skip
            want = cls(ref, num_steps=10, **kwargs).sample(
                noise, cond, generator=torch.Generator().manual_seed(0)
            )
            assert out.dtype == torch.float32 and set(states) == {torch.float32}
            assert _relative(out, want) <= SAMPLED[dtype], (cls.__name__, kwargs.get("method"))


@pytest.mark.parametrize("kind", ["mlp", "flow-transformer"])
def test_capture_and_the_input_vjp_in_bf16(kind):
    ref, low = _heads(kind, torch.bfloat16)
    noise, prev = torch.randn(2, 2, H, D)
    sampler = FlowSampler(low, num_steps=6)
    with torch.no_grad():
        torch.testing.assert_close(sampler.capture(noise)(noise), sampler.sample(noise),
                                   rtol=0, atol=0)  # fmt: skip
    t, u = torch.rand(2), torch.randn(2, H, D)
    out, pullback = low.forward_with_vjp(noise, t)
    _, pullback_ref = ref.forward_with_vjp(noise, t)
    assert out.dtype == pullback(u).dtype == torch.float32
    assert _relative(pullback(u), pullback_ref(u)) <= FORWARD[torch.bfloat16]
    # RTC through a bf16 head (its own VJP), float32 state
    rtc = RTCGuidance(prev, 4, execution_horizon=10)
    out = sampler.sample(noise, guidance=rtc).detach()
    want = FlowSampler(ref, num_steps=6).sample(noise, guidance=rtc)
    assert out.dtype == torch.float32
    assert _relative(out, want) <= SAMPLED[torch.bfloat16]
