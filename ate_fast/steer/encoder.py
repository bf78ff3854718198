"""One frozen view of whatever encoder the user hands to Steer or LatentGuidance.

Accepted (checked in this order):

* an object with ``.encode(a [B, H, D])`` returning ``(mu, logvar)`` or ``mu`` — the
  :class:`ate_fast.align` ActionVAE, or any VAE with that method;
* an ``nn.Module`` or plain callable returning ``(mu, logvar)`` or ``mu``.

``mu`` and ``logvar`` are ``[B, d_z]``. The encoder is frozen: modules are put in eval mode
(no dropout in the guidance gradient) and their parameters stop requiring gradients, so the
vector-Jacobian product computes only ``∂/∂x`` and nothing can ever reach the encoder's
``.grad``. The gradient code also differentiates with respect to ``x`` alone, so a plain
callable around a trainable module stays frozen too.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

LATENT_MODES = ("mean", "sample")


class FrozenEncoder:
    """Normalises ``vae_or_encoder`` to ``a [B, H, D] -> (mu [B, d_z], logvar or None)``.

    Args:
        vae_or_encoder: see the module docstring.
        freeze: put the modules found (the object itself and its ``.encoder``) in eval mode
            and set ``requires_grad=False`` on their parameters, in place. With
            ``freeze=False`` the modules are left as they are; no gradient reaches them
            either way.
        mask: passed on as ``encode(a, mask)`` when given — the ActionVAE's action mask
            ([D] or [B, D], 1 on the dims the robot has), which zeroes the absent dims so
            that their noise neither moves the latent nor receives guidance.
    """

    def __init__(
        self, vae_or_encoder: Any, freeze: bool = True, mask: Optional[Tensor] = None
    ) -> None:
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
        self.mask = mask
        encode = getattr(vae_or_encoder, "encode", None)
        if callable(encode):
            self._fn: Callable[[Tensor], Any] = encode
        elif callable(vae_or_encoder):
            self._fn = vae_or_encoder
        else:
            raise TypeError(
                "vae_or_encoder must have an .encode(a) method or be callable (an nn.Module "
                f"or function returning (mu, logvar) or mu), got {type(vae_or_encoder).__name__}"
            )
        self.source = vae_or_encoder
        self.modules: list[nn.Module] = [
            m
            for m in (vae_or_encoder, getattr(vae_or_encoder, "encoder", None))
            if isinstance(m, nn.Module)
        ]
        if freeze:
            for module in self.modules:
                module.eval()
                module.requires_grad_(False)

    def __call__(self, a: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Encode ``a`` [B, H, D] -> ``(mu [B, d_z], logvar [B, d_z] or None)``."""
        out = self._fn(a) if self.mask is None else self._fn(a, self.mask.to(a.device))
        if isinstance(out, Tensor):
            mu, logvar = out, None
        elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
            mu, logvar = out
            if logvar is not None and not isinstance(logvar, Tensor):
                raise TypeError(
                    "vae_or_encoder returned (mu, logvar) with logvar of type "
                    f"{type(logvar).__name__}; expected a tensor"
                )
        else:
            raise TypeError(
                "vae_or_encoder must return mu or (mu, logvar) as tensors, got "
                f"{type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        batch = a.shape[0]
        if mu.ndim != 2 or mu.shape[0] != batch:
            raise ValueError(
                f"vae_or_encoder must return mu of shape [B, d_z] = [{batch}, d_z] for an "
                f"input of shape {tuple(a.shape)}, got {tuple(mu.shape)}"
            )
        if logvar is not None and logvar.shape != mu.shape:
            raise ValueError(
                f"vae_or_encoder returned logvar of shape {tuple(logvar.shape)}; it must match "
                f"mu's {tuple(mu.shape)}"
            )
        return mu, logvar
