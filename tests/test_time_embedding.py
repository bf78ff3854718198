"""The sinusoidal time embedding: the host's float64 table rounded once, cached per device,
usable by autograd after a first call under inference_mode, a constant in traced graphs."""

from __future__ import annotations

import math

import torch

from ate_fast.models.time_embedding import DIFFUSION_PERIODS, PI0_PERIODS, sinusoidal_embedding


def _float64_embedding(t: torch.Tensor, dim: int, low: float, high: float) -> torch.Tensor:
    half = dim // 2
    period = [low * (high / low) ** (i / (half - 1)) for i in range(half)]
    frequency = torch.tensor([2 * math.pi / p for p in period], dtype=torch.float64)
    angle = t.double()[:, None] * frequency.float().double()[None, :]  # the rounded table
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def test_matches_the_float64_formula_for_both_period_settings():
    t = torch.tensor([0.0, 0.25, 1.0, 37.0, 999.0])
    for low, high in (PI0_PERIODS, DIFFUSION_PERIODS):
        got = sinusoidal_embedding(t, 64, low, high)
        assert got.dtype == torch.float32 and got.shape == (5, 64)
        # float32 angles: t·f rounded once, ≤ ½ ulp of the largest angle (t = 999: π0's
        # 1.57e6 rad, ½ ulp 0.0625; Diffusion Policy's 999 rad, ½ ulp 3.1e-5)
        bound = 0.0625 if low < 1 else 3.1e-5
        torch.testing.assert_close(got.double(), _float64_embedding(t, 64, low, high),
                                   rtol=0, atol=bound)  # fmt: skip


def test_cached_table_serves_autograd_after_inference_mode():
    """The cache's first entry made under inference_mode is no inference tensor: a later
    call with a t that requires grad can be differentiated."""
    with torch.inference_mode():
        first = sinusoidal_embedding(torch.rand(3), 40, *PI0_PERIODS)
    t = torch.rand(3, requires_grad=True)
    out = sinusoidal_embedding(t, 40, *PI0_PERIODS)
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and first.shape == out.shape


def test_traced_graph_holds_the_same_table():
    traced = torch.jit.trace(lambda t: sinusoidal_embedding(t, 32, *PI0_PERIODS), torch.rand(2))
    t = torch.rand(5)
    assert torch.equal(traced(t), sinusoidal_embedding(t, 32, *PI0_PERIODS))
