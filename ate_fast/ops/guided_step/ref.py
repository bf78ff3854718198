"""Plain PyTorch reference of the guided step: the definition of correct.

    out = a·x + b·(m + λ·clip(c·g, −κ, κ)) + d·m_prev + s·z     (λ = scale, κ = clamp)

Shapes: x, m, g, m_prev, z are ``[B, ...]`` (``[B, H, D]`` for action chunks);
a, b, c, d, s are ``[B]``. Computed in float32 (float64 for float64 data) and cast to
the data dtype once at the end, which is what the fused kernels do. κ at or above
float32's maximum (and ``inf``) means no clamp.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast.ops.constants import compute_dtype, effective_clamp


def _rows(coef: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] so that it broadcasts over a [B, ...] tensor of rank ndim."""
    return coef.reshape(coef.shape[0], *([1] * (ndim - 1)))


def guided_step_reference(
    x: Optional[Tensor],
    m: Tensor,
    a: Optional[Tensor],
    b: Tensor,
    g: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    m_prev: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    s: Optional[Tensor] = None,
    scale: float = 1.0,
    clamp: float = float("inf"),
) -> Tensor:
    """Reference guided step; arguments as in :func:`ate_fast.guided_step`. Returns [B, ...]."""
    cd = compute_dtype(m.dtype)
    n = m.ndim
    clamp = effective_clamp(clamp)  # κ ≥ float32 max: no clamp, as on every backend

    def up(t: Tensor) -> Tensor:
        return t.to(cd)

    corrected = up(m)
    if g is not None:
        corrected = corrected + scale * torch.clamp(_rows(up(c), n) * up(g), -clamp, clamp)
    out = _rows(up(b), n) * corrected
    if x is not None:
        out = _rows(up(a), n) * up(x) + out
    if m_prev is not None:
        out = out + _rows(up(d), n) * up(m_prev)
    if z is not None:
        out = out + _rows(up(s), n) * up(z)
    return out.to(m.dtype)
