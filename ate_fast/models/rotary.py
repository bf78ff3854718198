"""Rotary position embedding in the rotate-half layout (π0 / Gemma), as three kernels.

The rotation of ``x = [x1, x2]`` (halves of the last dim) by angles θ is
``[x1·cos θ − x2·sin θ, x2·cos θ + x1·sin θ]``. With the tables of :func:`rotary_tables`
(cos θ on both halves; −sin θ, sin θ) it is ``x·cos + swap(x)·sin``: one multiply, one
concatenation and one fused multiply-add (``addcmul``) instead of four multiplies, an add,
a subtract and a concatenation — a captured step launches each op as a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def rotary_tables(angle: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` [N, hd] in ``dtype`` for rotary angles [N, hd/2] (float32): each
    angle's cosine on both halves, and (−sin, sin) — the rotate-half rotation is then
    ``x·cos + swap(x)·sin`` (:func:`rotate`), three kernels instead of seven."""
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def swap_halves(x: Tensor) -> Tensor:
    """``[x2, x1]`` for ``x = [x1, x2]`` split on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Rotary positions (rotate-half layout) on the last dim of x [B, heads, N, hd] with
    the :func:`rotary_tables` cos/sin [N, hd]: ``[x1·c − x2·s, x2·c + x1·s]``, contiguous
    (the first operand is the concatenation's product, whose layout the result takes: the
    grouped-query fold of the rotated queries is then a view, not a copy); written into
    ``out`` (x's shape) when given."""
    return torch.addcmul(swap_halves(x) * sin, x, cos, out=out)
