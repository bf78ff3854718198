"""Sinusoidal embeddings of the diffusion timestep / flow time.

``period_i = min_period·(max_period/min_period)^(i/(n−1))`` for the ``n = dim/2`` channel
pairs, embedding ``[sin(2π·t/period), cos(2π·t/period)]``. Two settings cover the heads:

* π0 (flow time t ∈ [0, 1]): ``min_period=4e-3, max_period=4.0``;
* Diffusion Policy (integer timesteps): ``min_period=2π, max_period=2π·10⁴`` — the
  familiar ``exp(−log(10⁴)·i/(n−1))`` frequencies.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from ate_fast.models.trace_state import capturing_graph

PI0_PERIODS = (4e-3, 4.0)
DIFFUSION_PERIODS = (2 * math.pi, 2 * math.pi * 1e4)


def sinusoidal_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """``t`` [B] (any real dtype) -> [B, dim] float32 embedding; ``dim`` even, ≥ 4."""
    if dim % 2 or dim < 4:
        raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
    frequency = _frequencies(dim // 2, float(min_period), float(max_period), t)
    angle = t.to(torch.float32)[:, None] * frequency[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def _host_values(half: int, min_period: float, max_period: float) -> tuple[float, ...]:
    """``2π / period_i`` in float64 on the host."""
    ratio = max_period / min_period
    return tuple(2 * math.pi / (min_period * ratio ** (i / (half - 1))) for i in range(half))


_host_table = functools.lru_cache(maxsize=64)(_host_values)


# (half, min_period, max_period, device) -> the float32 table [half] on that device
_TABLES: dict[tuple, Tensor] = {}


def _frequencies(half: int, min_period: float, max_period: float, t: Tensor) -> Tensor:
    """``2π / period`` [half] float32 on ``t``'s device: the host's float64 values rounded
    once. Computed in the graph, an exported graph's folded constant came out of numpy's
    float32 pow (and float32 copies of the periods): up to 2 ulp from torch's, 0.04 in a
    sine at π0's periods and diffusion timesteps (angles ~1e5 rad). A traced graph holds
    the table as a constant; eager calls read it from a per-device cache (no host work
    or copy after the first call on a device: capturable)."""
    if capturing_graph() or type(t) is not Tensor:  # a constant of the traced graph
        # uncached (dynamo warns on lru_cache, and torch 2.4's cannot call its __wrapped__);
        # jit.trace's constant warning is this intent
        table = _host_values(half, min_period, max_period)
        if not torch.jit.is_tracing():
            return torch.tensor(table, dtype=torch.float32, device=t.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.tensor(table, dtype=torch.float32, device=t.device)
    table = _host_table(half, min_period, max_period)
    key = (half, min_period, max_period, t.device)
    cached = _TABLES.get(key)
    if cached is None:
        if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # no host-to-device copy in a CUDA graph: the same float64 values, on the GPU
            i = torch.arange(half, dtype=torch.float64, device=t.device)
            period = min_period * (max_period / min_period) ** (i / (half - 1))
            return (2 * math.pi / period).to(torch.float32)
        with torch.inference_mode(False):  # also usable by autograd outside inference mode
            cached = torch.tensor(table, dtype=torch.float32).to(t.device)
        _TABLES[key] = cached
    return cached
