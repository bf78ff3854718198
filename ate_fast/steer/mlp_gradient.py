"""When the guidance gradient can take the fused MLP kernel instead of autograd.

The fused op (:func:`ate_fast.ops.mlp_guidance`) computes exactly the forward of
``ate_fast.align``'s ``MLPEncoder``; it is used for that encoder (alone or inside an
``ActionVAE``) when the encoder's weights share ``x``'s dtype and device and autocast is
off. Anything else — a transformer encoder, a user's callable, mixed precision — keeps
the autograd reference. ``ATE_FAST_BACKEND`` still picks the fused op's backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast.ops import mlp_encoder_parts
from ate_fast.steer.encoder import FrozenEncoder


def _autocast_on(x: Tensor) -> bool:
    try:  # torch >= 2.4 takes the device type
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


def fused_mlp_parts(encoder: FrozenEncoder, x: Tensor) -> Optional[tuple]:
    """``(weights, biases, activation)`` if the fused kernel computes ``encoder`` at ``x``."""
    try:
        from ate_fast.align.mlp_vae import MLPEncoder
        from ate_fast.align.vae import ActionVAE
    except ImportError:  # a pure encoder callable needs no align package
        return None

    source = encoder.source
    module = source.encoder if isinstance(source, ActionVAE) else source
    if not isinstance(module, MLPEncoder):
        return None
    if _autocast_on(x):
        return None
    parts = mlp_encoder_parts(module)
    if parts is None:
        return None
    weights, biases, _ = parts
    for t in (*weights, *(b for b in biases if b is not None)):
        if t.dtype != x.dtype or t.device != x.device:
            return None
    return parts


def fused_latent_gradient(
    parts: tuple,
    x: Tensor,
    *,
    target: Optional[Tensor] = None,
    a0: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    reduction: str = "sample",
) -> Tensor:
    """``g`` [B, H, D] of ``−(1/N)‖E(x) − z*‖²`` (per sample or batch mean), fused."""
    from ate_fast.ops import mlp_guidance

    weights, biases, activation = parts
    dz = weights[-1].shape[0] // 2
    scale = 1.0 / dz if reduction == "sample" else 1.0 / (x.shape[0] * dz)

    def like_x(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(device=x.device, dtype=x.dtype).contiguous()

    g, _ = mlp_guidance(
        x.contiguous(), weights, biases, activation,
        target=like_x(target), a0=like_x(a0), mask=like_x(mask), eps=like_x(eps), scale=scale,
    )  # fmt: skip
    return g
