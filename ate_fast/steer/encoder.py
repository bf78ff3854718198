"""One frozen view of whatever encoder the user hands to Steer or LatentGuidance.

Accepted (checked in this order):

* an object with ``.encode(a [B, H, D])`` returning ``(mu, logvar)`` or ``mu`` — the
  :class:`ate_fast.align` ActionVAE, or any VAE with that method;
* an ``nn.Module`` or plain callable returning ``(mu, logvar)`` or ``mu``.

``mu`` and ``logvar`` are ``[B, d_z]``.

It is also the one place that decides how the guidance gradient through the encoder is
computed (:attr:`FrozenEncoder.gradient_path`), once, at construction: the fused MLP
kernel (:func:`ate_fast.mlp_guidance`) for ``ate_fast.align``'s MLP encoder, the
hand-written VJP (:mod:`ate_fast.steer.transformer_vjp`) for its Transformer encoder, and
autograd for anything else. A call falls back to autograd only where the fused path
cannot run its input (:meth:`FrozenEncoder.path_for`: dtype/device of the weights,
autocast, a shape the encoder does not take).

The encoder is frozen: modules are put in eval mode
(no dropout in the guidance gradient) and their parameters stop requiring gradients, so the
vector-Jacobian product computes only ``∂/∂x`` and nothing can ever reach the encoder's
``.grad``. The gradient code also differentiates with respect to ``x`` alone, so a plain
callable around a trainable module stays frozen too.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ate_fast.align.mlp_vae import MLPEncoder
from ate_fast.align.vae import ActionVAE
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.module_checks import plain_tree
from ate_fast.ops import mlp_encoder_parts
from ate_fast.steer import transformer_vjp

LATENT_MODES = ("mean", "sample")


def autocast_enabled(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (the fused paths then stand aside:
    autocast changes the encoder's precision, which they would not reproduce)."""
    try:  # torch >= 2.4 takes the device type
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()


def _refuse_path(vae_or_encoder: Any) -> None:
    """A path (``str`` has an ``.encode`` method) is not an encoder: say how to load it."""
    if isinstance(vae_or_encoder, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(
            f"vae_or_encoder must be a VAE or encoder, got a path ({vae_or_encoder!r}); load "
            "the checkpoint first: ckpt = ate_fast.align.load_checkpoint(path), then pass "
            "ckpt.vae (and ckpt.prior as LatentGuidance's target)"
        )


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
        _refuse_path(vae_or_encoder)
        if mask is not None and not isinstance(mask, Tensor):
            raise ArgumentTypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
        self.mask = mask
        encode = getattr(vae_or_encoder, "encode", None)
        if callable(encode):
            self._fn: Callable[[Tensor], Any] = encode
        elif callable(vae_or_encoder):
            self._fn = vae_or_encoder
        else:
            raise ArgumentTypeError(
                "vae_or_encoder must have an .encode(a) method or be callable (an nn.Module "
                f"or function returning (mu, logvar) or mu), got {type(vae_or_encoder).__name__}"
            )
        self.source = vae_or_encoder
        self.frozen = freeze
        self.modules: list[nn.Module] = [
            m
            for m in (vae_or_encoder, getattr(vae_or_encoder, "encoder", None))
            if isinstance(m, nn.Module)
        ]
        self._dtype_key: Optional[tuple] = None  # weight_dtype's cache (see there)
        self._weight_dtype: Optional[torch.dtype] = None
        if freeze:
            for module in self.modules:
                module.eval()
                module.requires_grad_(False)
        module = vae_or_encoder.encoder if isinstance(vae_or_encoder, ActionVAE) else None
        module = vae_or_encoder if module is None else module
        # The path is decided here; the weights are read per call (a load_state_dict with
        # assign=True may replace the Parameter objects).
        self._mlp: Optional[nn.Module] = (
            module
            if isinstance(module, MLPEncoder) and mlp_encoder_parts(module) is not None
            else None
        )
        self.transformer: Optional[nn.Module] = transformer_vjp.align_transformer_encoder(module)
        if self._mlp is not None:
            self.gradient_path = "mlp_fused"
        elif self.transformer is not None:
            self.gradient_path = "transformer_vjp"
        else:
            self.gradient_path = "autograd"

    @property
    def mlp_parts(self) -> Optional[tuple]:
        """``(weights, biases, activation)`` of the align MLP encoder (the fused path's
        arguments, :func:`ate_fast.ops.mlp_encoder_parts`), or None on another path."""
        return None if self._mlp is None else mlp_encoder_parts(self._mlp)

    def mlp_plain(self) -> bool:
        """The align MLP encoder still has no forward hook or wrapped layer (the prepared
        call's per-step structural re-check; ≈ 2–4 µs)."""
        return self._mlp is not None and plain_tree(self._mlp)

    def mlp_tensors(self) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        """The align MLP encoder's current ``(weights, biases)`` (the fused path's tensors,
        read without re-recognising the module: for the prepared call's cheap re-check)."""
        layers = self._mlp.layers  # type: ignore[union-attr]
        return [m.weight for m in layers], [m.bias for m in layers]

    @property
    def weight_dtype(self) -> Optional[torch.dtype]:
        """The floating dtype of the encoder's parameters when they share one (the dtype
        it computes in: the guidance casts its input there and the gradient back), else
        None (a plain callable, or mixed dtypes: the input is passed as it comes).

        Read every guidance call, so the scan of every parameter (≈ 0.4 ms for the paper's
        Transformer encoder) runs only when the first floating parameter changed object or
        dtype since the last scan (``module.to(...)``, ``load_state_dict(assign=True)``).
        """
        probe = self._first_floating_parameter()
        key = None if probe is None else (id(probe), probe.dtype)
        if key != self._dtype_key:
            dtypes = {
                p.dtype for m in self.modules for p in m.parameters() if p.is_floating_point()
            }
            self._dtype_key = key
            self._weight_dtype = dtypes.pop() if len(dtypes) == 1 else None
        return self._weight_dtype

    def _first_floating_parameter(self) -> Optional[nn.Parameter]:
        for module in self.modules:
            for p in module.parameters():
                if p.is_floating_point():
                    return p
        return None

    @property
    def latent_dim(self) -> Optional[int]:
        """d_z where the encoder's structure says it (the fused paths), else None."""
        if self._mlp is not None:
            return self.mlp_parts[0][-1].shape[0] // 2
        if self.transformer is not None:
            return self.transformer.latent_dim
        return None

    def path_for(self, x: Tensor) -> str:
        """The gradient path for ``x`` [B, H, D]: :attr:`gradient_path`, or ``"autograd"``
        where that path cannot compute the encoder at ``x`` (weights in another dtype or on
        another device, autocast on, a shape the encoder does not take, or the
        Transformer VJP switched off by ``ATE_FAST_TRANSFORMER_GUIDANCE``)."""
        path = self.gradient_path
        if path == "autograd" or autocast_enabled(x):
            return "autograd"
        if path == "mlp_fused":
            parts = self.mlp_parts  # None once a hook or another layer type appeared
            if parts is None:
                return "autograd"
            mlp = self._mlp
            if x.dim() != 3 or tuple(x.shape[1:]) != (mlp.horizon, mlp.action_dim):
                return "autograd"  # the kernel checks H·D only; the encoder names the shape
            weights, biases, _ = parts
            tensors = (*weights, *(b for b in biases if b is not None))
        else:
            module = self.transformer
            if not self.frozen and not transformer_vjp.supported_encoder(module):
                return "autograd"  # not frozen: it may be in training mode with dropout now
            if x.dim() != 3 or tuple(x.shape[1:]) != (module.horizon, module.action_dim):
                return "autograd"  # autograd's encoder call raises the clear shape error
            if transformer_vjp.selected_path(x.device.type) == "autograd":
                return "autograd"
            tensors = tuple(module.parameters())
        if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
            return "autograd"
        return path

    def __call__(self, a: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Encode ``a`` [B, H, D] -> ``(mu [B, d_z], logvar [B, d_z] or None)``."""
        out = self._fn(a) if self.mask is None else self._fn(a, self.mask.to(a.device))
        if isinstance(out, Tensor):
            mu, logvar = out, None
        elif isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
            mu, logvar = out
            if logvar is not None and not isinstance(logvar, Tensor):
                raise ArgumentTypeError(
                    "vae_or_encoder returned (mu, logvar) with logvar of type "
                    f"{type(logvar).__name__}; expected a tensor"
                )
        else:
            raise ArgumentTypeError(
                "vae_or_encoder must return mu or (mu, logvar) as tensors, got "
                f"{type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
            )
        batch = a.shape[0]
        if mu.ndim != 2 or mu.shape[0] != batch:
            raise InvalidArgumentError(
                f"vae_or_encoder must return mu of shape [B, d_z] = [{batch}, d_z] for an "
                f"input of shape {tuple(a.shape)}, got {tuple(mu.shape)}"
            )
        if logvar is not None and logvar.shape != mu.shape:
            raise InvalidArgumentError(
                f"vae_or_encoder returned logvar of shape {tuple(logvar.shape)}; it must match "
                f"mu's {tuple(mu.shape)}"
            )
        return mu, logvar
