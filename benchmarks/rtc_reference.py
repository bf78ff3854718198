"""Real-time chunking's guided velocity written out with autograd: what a user's own RTC
loop computes at each step (openpi convention), the eager baseline of ``bench_rtc.py`` and
of ``bench_realsize.py``'s ``rtc-guided`` rows (one step function for both)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def autograd_rtc_velocity(
    model: Callable[[Tensor, Tensor, Any], Tensor], x: Tensor, t_vec: Tensor, t: float,
    cond: Any, prev: Tensor, weights: Tensor, guidance_weight: float,
) -> Tensor:  # fmt: skip
    """``v − min(β, w(t))·g`` [B, H, D] at time ``t``: ``v = model(x, t_vec, cond)``,
    ``x̂₁ = x − t·v``, ``g`` the VJP of ``x̂₁`` with ``(prev − x̂₁)·W`` (``prev`` [B, H, D],
    ``weights`` W broadcastable to it, ``guidance_weight`` min(β, w(t))); autograd through
    the model, inside ``torch.no_grad()`` too."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = model(xg, t_vec, cond)
        x1 = xg - t * v
        (g,) = torch.autograd.grad(x1, xg, (prev - x1) * weights)
    return v.detach() - guidance_weight * g
