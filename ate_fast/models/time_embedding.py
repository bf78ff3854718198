"""Sinusoidal embeddings of the diffusion timestep / flow time.

``period_i = min_period·(max_period/min_period)^(i/(n−1))`` for the ``n = dim/2`` channel
pairs, embedding ``[sin(2π·t/period), cos(2π·t/period)]``. Two settings cover the heads:

* π0 (flow time t ∈ [0, 1]): ``min_period=4e-3, max_period=4.0``;
* Diffusion Policy (integer timesteps): ``min_period=2π, max_period=2π·10⁴`` — the
  familiar ``exp(−log(10⁴)·i/(n−1))`` frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PI0_PERIODS = (4e-3, 4.0)
DIFFUSION_PERIODS = (2 * math.pi, 2 * math.pi * 1e4)


def sinusoidal_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """``t`` [B] (any real dtype) -> [B, dim] float32 embedding; ``dim`` even, ≥ 4."""
    if dim % 2 or dim < 4:
        raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    fraction = torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.to(torch.float32)[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)
