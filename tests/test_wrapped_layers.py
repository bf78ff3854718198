"""The reference heads read some layers' weights directly — the folded first-layer bias,
the split time MLP, residual adds as GEMM operands, the hand-written input-VJPs
(``ate_fast/models/direct_weights.py``). A layer wrapped by the user (LoRA, a quantization
wrapper) or hooked must still count: every head equals, in float64, the same head with the
adapter merged into its weights — forward, step features through the samplers, the
input-VJP and real-time chunking through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ate_fast
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import make_head
from ate_fast.realtime import RTCGuidance

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
