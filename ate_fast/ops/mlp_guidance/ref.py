"""Plain PyTorch reference of the fused MLP-encoder guidance gradient.

The VJP is written out as forward ops (no autograd): the same decomposition the ONNX
export uses, and the definition the fused kernels are checked against.

Encoder (``ate_fast.align`` MLP encoder): ``h_0 = mask ⊙ x`` flattened to ``[B, F]``,
``h_{l+1} = act(W_l h_l + b_l)`` for hidden layers, ``out = W_{L−1} h_{L−1} + b_{L−1} =
concat(μ, log σ²)``. Latent ``z = μ`` (``+ exp(log σ²/2) ⊙ ε`` when ``eps`` is given).
Returns ``g = ∇_x y`` with ``y = −w·Σ_j (z_j − z*_j)²`` per sample (w = ``distance_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ate_fast.errors import InvalidArgumentError
from ate_fast.ops.constants import ACTIVATIONS


def activation_and_grad(name: str, u: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(u), act'(u))`` with torch's formulas (exact erf GELU)."""
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * u * u) * (1.0 / math.sqrt(2.0 * math.pi))
        return F.gelu(u), cdf + u * pdf
    if name == "silu":
        s = torch.sigmoid(u)
        return u * s, s * (1.0 + u * (1.0 - s))
    if name == "relu":
        return torch.relu(u), (u > 0).to(u.dtype)
    if name == "tanh":
        t = torch.tanh(u)
        return t, 1.0 - t * t
    raise InvalidArgumentError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _masked_flat(a: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``[B, H, D]`` (mask ``[D]`` or ``[B, D]``) -> ``[B, H·D]``."""
    if mask is not None:
        a = a * (mask if mask.dim() == 2 else mask[None]).to(a.dtype)[:, None, :]
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])  # explicit: B may be 0


def _forward(
    h: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], activation: str
) -> tuple[Tensor, list[Tensor]]:
    """Output ``[B, 2·d_z]`` and act'(pre) of every hidden layer."""
    grads = []
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if i < last:
            h, dact = activation_and_grad(activation, h)
            grads.append(dact)
    return h, grads


def _latent(out: Tensor, eps: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    mu, logvar = out.chunk(2, dim=1)
    if eps is None:
        return mu, None
    sigma = torch.exp(0.5 * logvar)
    return mu + sigma * eps, sigma


def mlp_guidance_reference(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activation: str,
    target: Optional[Tensor] = None,
    a0: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    distance_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(g [B, H, D], z [B, d_z])``; arguments as in :func:`ate_fast.mlp_guidance`."""
    out, dacts = _forward(_masked_flat(x, mask), weights, biases, activation)
    z, sigma = _latent(out, eps)
    if a0 is not None:
        target = _latent(_forward(_masked_flat(a0, mask), weights, biases, activation)[0], eps)[0]
    dz = -2.0 * distance_weight * (z - target)
    if eps is None:
        delta = torch.cat([dz, torch.zeros_like(dz)], dim=1)
    else:
        delta = torch.cat([dz, dz * eps * 0.5 * sigma], dim=1)
    for i in range(len(weights) - 1, -1, -1):
        delta = delta @ weights[i]
        if i > 0:
            delta = delta * dacts[i - 1]
    g = delta.reshape(x.shape)
    if mask is not None:
        g = g * (mask if mask.dim() == 2 else mask[None]).to(g.dtype)[:, None, :]
    return g, z
