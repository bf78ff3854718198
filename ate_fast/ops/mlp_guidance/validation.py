"""Argument checks of the fused MLP guidance (metadata only: they also run on fake
tensors while tracing)."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, LimitExceededError
from ate_fast.ops.constants import ACTIVATIONS, DTYPE_CODES, MAX_MLP_LAYERS


def validate(x, weights, biases, activation, target, a0, mask, eps, distance_weight) -> None:
    """Raise a ValueError/TypeError naming the first bad argument."""
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"mlp_guidance: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_CODES:
        raise ArgumentTypeError(
            f"mlp_guidance: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if x.ndim != 3:
        raise InvalidArgumentError(f"mlp_guidance: x must be [B, H, D], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise InvalidArgumentError("mlp_guidance: x must be contiguous")
    if activation not in range(len(ACTIVATIONS)):
        raise InvalidArgumentError(
            f"mlp_guidance: activation code must be 0..{len(ACTIVATIONS) - 1}"
        )
    dz = _check_layers(x, weights, biases)
    _check_latent_inputs(x, dz, target, a0, mask, eps)
    if not math.isfinite(distance_weight):
        raise InvalidArgumentError(
            f"mlp_guidance: distance_weight must be finite, got {distance_weight}"
        )


def validate_gradient_out(g: Tensor, x: Tensor) -> None:
    """The destination ``g`` must be a contiguous tensor like ``x``."""
    if not isinstance(g, Tensor):
        raise ArgumentTypeError(f"mlp_guidance: g must be a torch.Tensor, got {type(g).__name__}")
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device or not g.is_contiguous():
        raise InvalidArgumentError("mlp_guidance: g must be a contiguous tensor like x")


def validate_latent_out(z: Tensor, x: Tensor, dz: int) -> None:
    """The destination ``z`` must be a contiguous ``[B, d_z]`` tensor of ``x``'s dtype and
    device."""
    if not isinstance(z, Tensor):
        raise ArgumentTypeError(f"mlp_guidance: z must be a torch.Tensor, got {type(z).__name__}")
    if (
        tuple(z.shape) != (x.shape[0], dz) or z.dtype != x.dtype or z.device != x.device
        or not z.is_contiguous()
    ):  # fmt: skip
        raise InvalidArgumentError(
            f"mlp_guidance: z must be a contiguous [B, d_z] = [{x.shape[0]}, {dz}] tensor of "
            f"x's dtype {x.dtype} on {x.device}, got {tuple(z.shape)} {z.dtype} on {z.device}"
        )


def _check_layers(x: Tensor, weights, biases) -> int:
    """Check the layer chain from ``H·D`` inputs to ``2·d_z`` outputs; returns d_z."""
    if len(weights) > MAX_MLP_LAYERS:
        raise LimitExceededError(
            f"mlp_guidance: 1..{MAX_MLP_LAYERS} weights expected (MAX_MLP_LAYERS, the "
            f"kernels' bound), got {len(weights)} weights"
        )
    if not 1 <= len(weights) <= MAX_MLP_LAYERS or len(biases) != len(weights):
        raise InvalidArgumentError(
            f"mlp_guidance: 1..{MAX_MLP_LAYERS} weights and as many biases (None allowed) "
            f"expected, got {len(weights)} weights and {len(biases)} biases"
        )
    width = x.shape[1] * x.shape[2]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if not isinstance(w, Tensor):
            raise ArgumentTypeError(
                f"mlp_guidance: weights[{i}] must be a torch.Tensor, got {type(w).__name__}"
            )
        if b is not None and not isinstance(b, Tensor):
            raise ArgumentTypeError(
                f"mlp_guidance: biases[{i}] must be a torch.Tensor or None, got {type(b).__name__}"
            )
        if w.ndim != 2 or w.shape[1] != width:
            raise InvalidArgumentError(
                f"mlp_guidance: weights[{i}] must be [out, {width}], got {tuple(w.shape)}"
            )
        _same("weights", i, w, x)
        if w.shape[0] == 0 or w.shape[1] == 0:
            raise InvalidArgumentError(
                f"mlp_guidance: weights[{i}] must have at least one input and one output "
                f"(a zero-width layer has no gradient to give), got {tuple(w.shape)}"
            )
        width = w.shape[0]
        if b is not None:
            if tuple(b.shape) != (width,):
                raise InvalidArgumentError(f"mlp_guidance: biases[{i}] must be [{width}] or None")
            _same("biases", i, b, x)
    if width % 2:
        raise InvalidArgumentError(
            f"mlp_guidance: the last layer must output 2·d_z values, got {width}"
        )
    return width // 2


def _check_latent_inputs(x: Tensor, dz: int, target, a0, mask, eps) -> None:
    batch = x.shape[0]
    if (target is None) == (a0 is None):
        raise InvalidArgumentError(
            "mlp_guidance: give exactly one of target (z*) and a0 (z* = E(a0))"
        )
    if target is not None and tuple(target.shape) not in ((dz,), (batch, dz)):
        raise InvalidArgumentError(
            f"mlp_guidance: target must be [d_z] = [{dz}] or [B, d_z] = [{batch}, {dz}], "
            f"got {tuple(target.shape)}"
        )
    if a0 is not None and a0.shape != x.shape:
        raise InvalidArgumentError(
            f"mlp_guidance: a0 must have x's shape {tuple(x.shape)}, got {tuple(a0.shape)}"
        )
    if mask is not None and tuple(mask.shape) not in ((x.shape[2],), (batch, x.shape[2])):
        raise InvalidArgumentError(
            f"mlp_guidance: mask must be [D] = [{x.shape[2]}] or [B, D], got {tuple(mask.shape)}"
        )
    if eps is not None and tuple(eps.shape) != (batch, dz):
        raise InvalidArgumentError(
            f"mlp_guidance: eps must be [B, d_z] = [{batch}, {dz}], got {tuple(eps.shape)}"
        )
    for name, t in (("target", target), ("a0", a0), ("mask", mask), ("eps", eps)):
        if t is not None:
            _same(name, None, t, x)


def _same(name: str, index: Optional[int], t: Tensor, x: Tensor) -> None:
    label = name if index is None else f"{name}[{index}]"
    if t.dtype != x.dtype:
        raise ArgumentTypeError(
            f"mlp_guidance: {label} must have x's dtype {x.dtype}, got {t.dtype}"
        )
    if t.device != x.device:
        raise InvalidArgumentError(
            f"mlp_guidance: {label} must be on x's device {x.device}, got {t.device}"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(f"mlp_guidance: {label} must be contiguous")
