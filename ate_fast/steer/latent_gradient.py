"""The guidance gradient ``g = ∇_x y(x)``, ``y(x) = −(1/N)‖E(x) − z*‖²`` (ATE_METHOD.md).

:func:`latent_distance_gradient` is the one entry point for Steer and LatentGuidance: it
runs the path the :class:`~ate_fast.steer.encoder.FrozenEncoder` chose (fused MLP
kernel, hand-written Transformer VJP, or autograd). The autograd path is the reference:
one encoder forward and one vector-Jacobian product through the frozen encoder,
differentiating with respect to ``x`` only (no gradient reaches the encoder or whatever
produced ``x``; the result is a constant). It runs under
``torch.enable_grad`` and outside inference mode, so the samplers may call it from inside
``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice
from ate_fast.errors import InvalidArgumentError
from ate_fast.steer.encoder import LATENT_MODES, FrozenEncoder, autocast_enabled
from ate_fast.steer.mlp_gradient import mlp_fused_gradient
from ate_fast.steer.transformer_vjp import vjp_function

REDUCTIONS = ("sample", "batch")


def select_latent(
    mu: Tensor, logvar: Optional[Tensor], latent: str, eps: Optional[Tensor]
) -> Tensor:
    """``mu`` for ``latent="mean"``; ``mu + exp(logvar / 2)·eps`` for ``latent="sample"``."""
    if latent == "mean":
        return mu
    if logvar is None:
        raise InvalidArgumentError(
            'latent="sample" needs an encoder that returns (mu, logvar); this one returns mu only'
        )
    _check_eps(eps, tuple(mu.shape))
    return mu + torch.exp(0.5 * logvar) * eps


def _check_eps(eps: Optional[Tensor], shape: tuple[int, ...]) -> None:
    """``latent="sample"`` needs ``eps`` with the shape of ``mu`` ([B, d_z])."""
    if eps is None or tuple(eps.shape) != shape:
        raise InvalidArgumentError(
            f"eps must have mu's shape {shape} for latent='sample', got "
            f"{None if eps is None else tuple(eps.shape)}"
        )


def _check_target(
    target: Tensor,
    dz: int,
    batch: int,
    name: str,
    latent: str = "mean",
    eps: Optional[Tensor] = None,
) -> None:
    """``target`` is [d_z] or [B, d_z]; for ``latent="sample"`` also ``eps`` [B, d_z], as
    :func:`select_latent` checks it (the fused paths never call it on ``mu``)."""
    if target.shape not in ((dz,), (batch, dz)):
        raise InvalidArgumentError(
            f"{name} must be a latent [d_z] = [{dz}] or a batch [B, d_z] = {[batch, dz]} "
            f"matching the encoder, got shape {tuple(target.shape)}"
        )
    if latent == "sample":
        _check_eps(eps, (batch, dz))


def _autograd_ready(t: Tensor) -> Tensor:
    """Inference-mode tensors cannot enter autograd; a clone outside inference mode can."""
    return t.clone() if t.is_inference() else t


def latent_distance_gradient(
    encoder: FrozenEncoder,
    x: Tensor,
    target: Optional[Tensor] = None,
    *,
    a0: Optional[Tensor] = None,
    latent: str = "mean",
    eps: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "sample",
    target_name: str = "target",
) -> Tensor:
    """``g = ∇_x y`` for ``x`` [B, H, D] -> g [B, H, D], toward ``target`` (z*, [B, d_z] or
    [d_z]) or toward the latent of ``a0`` [B, H, D] (Steer: ``z* = E(a0)``).

    ``reduction="sample"``: ``y_i = −(1/N)‖E(x_i) − z*_i‖²`` for each sample on its own (the
    paper's equation; computed as the gradient of ``Σ_i y_i``, exact because the encoder
    treats samples independently). ``reduction="batch"``: ``y = −mean over batch and latent``
    (the released code), which divides each sample's gradient by B.

    ``latent="sample"`` uses ``z = μ + exp(½ log σ²)·ε``: with ``a0`` one ε [B, d_z] is
    drawn from ``generator`` and shared by ``x`` and ``a0``; with ``target`` it is ``eps``.
    """
    if (target is None) == (a0 is None):
        raise InvalidArgumentError("latent_distance_gradient: give exactly one of target and a0")
    # the paths test `== "sample"` and take anything else for the other choice
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("latent", latent, LATENT_MODES)
    weight_dtype = encoder.weight_dtype
    if (
        weight_dtype is not None
        and x.is_floating_point()
        and x.dtype != weight_dtype
        and not autocast_enabled(x)
    ):
        # mixed precision: the encoder computes in its weights' dtype (bf16/fp16 weights and
        # activations), the sampler state and the gradient handed back stay in x's
        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None or not t.is_floating_point() else t.to(weight_dtype)

        g = latent_distance_gradient(
            encoder, x.to(weight_dtype), cast(target), a0=cast(a0), latent=latent,
            eps=cast(eps), generator=generator, reduction=reduction, target_name=target_name,
        )  # fmt: skip
        return g.to(x.dtype)
    path = encoder.path_for(x)
    if a0 is not None:
        if path == "mlp_fused":  # one fused call encodes a0 and x and backpropagates to x
            if latent == "sample":
                eps = torch.randn(
                    (x.shape[0], encoder.latent_dim), generator=generator, device=x.device,
                    dtype=x.dtype,
                )  # fmt: skip
            return mlp_fused_gradient(
                encoder.mlp_parts, x, a0=a0, mask=encoder.mask,
                eps=eps if latent == "sample" else None, reduction=reduction,
            )  # fmt: skip
        target, eps = _latent_of(encoder, a0, latent, generator)
        target_name = "E(a0)"
    if path == "mlp_fused":
        _check_target(target, encoder.latent_dim, x.shape[0], target_name, latent, eps)
        return mlp_fused_gradient(
            encoder.mlp_parts, x, target=target, mask=encoder.mask,
            eps=eps if latent == "sample" else None, reduction=reduction,
        )  # fmt: skip
    if path == "transformer_vjp":
        _check_target(target, encoder.latent_dim, x.shape[0], target_name, latent, eps)
        mask = None if encoder.mask is None else encoder.mask.to(x.device)  # as the others
        with torch.no_grad():
            return vjp_function(x.device.type, x.shape[0], x.dtype)(
                encoder.transformer, x, target.to(device=x.device, dtype=x.dtype),
                mask=mask, eps=eps if latent == "sample" else None, reduction=reduction,
            )  # fmt: skip
    return _autograd_gradient(encoder, x, target, latent, eps, reduction, target_name)


def _latent_of(
    encoder: FrozenEncoder, a0: Tensor, latent: str, generator: Optional[torch.Generator]
) -> tuple[Tensor, Optional[Tensor]]:
    """``(E(a0) [B, d_z], ε or None)``: the target latent of a clean chunk, no gradient."""
    with torch.no_grad():
        mu0, logvar0 = encoder(a0)
        eps = None
        if latent == "sample":
            eps = torch.randn(mu0.shape, generator=generator, device=mu0.device, dtype=mu0.dtype)
        return select_latent(mu0, logvar0, latent, eps), eps


def _autograd_gradient(
    encoder: FrozenEncoder,
    x: Tensor,
    target: Tensor,
    latent: str,
    eps: Optional[Tensor],
    reduction: str,
    target_name: str,
) -> Tensor:
    """The reference: one forward and one VJP through the encoder, w.r.t. ``x`` only."""
    with torch.inference_mode(False), torch.enable_grad():
        point = _autograd_ready(x).detach().requires_grad_(True)
        mu, logvar = encoder(point)
        if eps is not None:
            eps = _autograd_ready(eps)
        z = select_latent(mu, logvar, latent, eps)
        _check_target(target, z.shape[1], z.shape[0], target_name)
        target = _autograd_ready(target).to(device=z.device, dtype=z.dtype)
        squared = (z - target).square()
        y = -squared.mean(dim=1).sum() if reduction == "sample" else -squared.mean()
        if not y.requires_grad:  # the encoder ignores its input: y is constant in x
            return torch.zeros_like(point, memory_format=torch.contiguous_format)
        (g,) = torch.autograd.grad(y, point, allow_unused=True)
    if g is None:
        return torch.zeros_like(point, memory_format=torch.contiguous_format)
    return g.contiguous()
