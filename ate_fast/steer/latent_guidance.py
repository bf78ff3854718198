"""Inference-time steering toward a target latent (ATE_METHOD.md, beyond the paper).

    direct:  y(x) = −(1/N)‖E(x) − z*‖²,          g = ∇_x y
    tweedie: y(x) = −(1/N)‖E(x̂0(x)) − z*‖²,     g = (∂x̂0/∂x) · ∇_{x̂0} y   (scalar ∂x̂0/∂x)

The sampler applies ``model_out + λ·clip(c·g, −κ, κ)`` every step (see
:class:`ate_fast.guidance.Guidance`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError
from ate_fast.guidance import SCALAR_SLOPE_MODES, check_scale_and_clamp
from ate_fast.ops.mlp_guidance.prepared import PreparedMlpGuidance, prepare_mlp_guidance
from ate_fast.steer import validation as check
from ate_fast.steer.encoder import FrozenEncoder, autocast_enabled
from ate_fast.steer.latent_gradient import latent_distance_gradient


def _target_tensor(target: Any) -> Tensor:
    """A latent [d_z], a batch [B, d_z], or an object with a ``.mean`` [d_z] (LatentPrior)."""
    value = target if isinstance(target, Tensor) else getattr(target, "mean", None)
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(
            "target must be a latent tensor [d_z] or [B, d_z], or an object with a .mean "
            f"tensor (a LatentPrior), got {type(target).__name__}"
        )
    if value.ndim not in (1, 2) or value.numel() == 0 or not value.is_floating_point():
        raise InvalidArgumentError(
            "target must be a floating latent [d_z] or batch [B, d_z], got "
            f"{value.dtype} of shape {tuple(value.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError("target contains NaN or inf (expected a finite latent)")
    return value.detach()


class LatentGuidance:
    """Steer sampling toward ``target`` through the frozen encoder (implements ``Guidance``).

    Args:
        vae_or_encoder: as for :class:`ate_fast.steer.Steer` (frozen in place unless
            ``freeze=False``).
        target: z*, a latent [d_z], a batch [B, d_z] (one per sample), or a LatentPrior
            (its ``.mean``), e.g. the mean stage-2 latent or encodings of target demos.
        scale: λ.
        clamp: κ (``math.inf``: no clamp).
        mode: ``"direct"`` or ``"tweedie"``.
        mask: the ActionVAE's action mask ([D] or [B, D]), passed as ``encode(a, mask)``.

    ``gradient`` returns a tensor of ``x``'s dtype. The gradient itself runs in
    :meth:`latent_gradient`, on the path the encoder's
    :class:`~ate_fast.steer.encoder.FrozenEncoder` chose (fused MLP kernel, hand-written
    Transformer VJP, or autograd).
    """

    def __init__(
        self,
        vae_or_encoder: Any,
        target: Any,
        scale: float = 2.0,
        clamp: float = 0.1,
        mode: str = "direct",
        *,
        freeze: bool = True,
        mask: Optional[Tensor] = None,
    ) -> None:
        check_scale_and_clamp(scale, clamp)
        check_choice("mode", mode, SCALAR_SLOPE_MODES)
        self.encoder = FrozenEncoder(vae_or_encoder, freeze=freeze, mask=mask)
        self.set_target(target)
        self.scale = float(scale)
        self.clamp = float(clamp)
        self.mode = mode

    def set_target(self, target: Any) -> None:
        """Replace z* (a latent [d_z], a batch [B, d_z] or a LatentPrior)."""
        self.target = _target_tensor(target)
        self._placed: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._prepared: Optional[_PreparedGradient] = None
        # the prepared call the last latent_gradient() took or built (None: it took neither)
        self._last_prepared: Optional[_PreparedGradient] = None

    def __repr__(self) -> str:
        return (
            f"LatentGuidance(target={tuple(self.target.shape)}, scale={self.scale}, "
            f"clamp={self.clamp}, mode={self.mode!r})"
        )

    @property
    def reads_x_only(self) -> bool:
        """Mode ``"direct"``: the gradient reads ``x`` alone (``Guidance.reads_x_only``; a
        sampler may compute it beside the model, ``x0_hat`` and ``dx0_dx`` then None) —
        unless a subclass or the instance replaces :meth:`gradient`, which may read them."""
        replaced = type(self).gradient is not LatentGuidance.gradient or "gradient" in vars(self)
        return self.mode == "direct" and not replaced

    def gradient(self, x: Tensor, x0_hat: Optional[Tensor], dx0_dx: Optional[Tensor]) -> Tensor:
        """``g`` [B, H, D] at ``x`` [B, H, D] (``x0_hat`` [B, H, D], ``dx0_dx`` [B]: tweedie;
        unread, and may be None, in mode ``"direct"``)."""
        if self.mode == "direct":
            check.check_chunks(x=x)
            return self.latent_gradient(x).to(x.dtype)
        check.check_chunks(x=x, x0_hat=x0_hat)
        check.check_per_sample("dx0_dx", dx0_dx, x.shape[0])
        return _chain(self.latent_gradient(x0_hat), dx0_dx, x.dtype)

    def call_gradient(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """:meth:`gradient` for the evaluations of one sampler call (the optional
        ``Guidance.call_gradient``; the samplers ask once per call, before its first
        evaluation, unless a step callback runs between evaluations).

        Its first evaluation takes :meth:`gradient`. When that took the prepared fused CPU
        call, later evaluations whose sample has the same shape, dtype, device and layout
        go straight to it: the rest of the prepared call's re-check (the encoder's weight
        and target storage, hooks, mask, autocast, the backend selection) reads what
        nothing running between two evaluations of one call changes — the sampler's own
        code and the head — and costs ≈ 30–50 µs per step on one CPU thread, where the
        encoder's streaming has just evicted the interpreter's state from L2. A new
        target (:meth:`set_target`) drops the prepared call: the next evaluation takes
        :meth:`gradient` again. Where a subclass or the instance replaces :meth:`gradient`
        or :meth:`latent_gradient`, that :meth:`gradient` runs at every evaluation.
        """
        cls, own = type(self), vars(self)
        if (
            cls.gradient is not LatentGuidance.gradient
            or cls.latent_gradient is not LatentGuidance.latent_gradient
            or "gradient" in own
            or "latent_gradient" in own  # replaced on the instance (a wrapper, a mock)
        ):
            return self.gradient
        return _CallGradient(self)

    def latent_gradient(self, point: Tensor) -> Tensor:
        """``∇_p −(1/N)‖E(p) − z*‖²`` per sample at ``point`` [B, H, D] -> [B, H, D].

        Computed by :func:`~ate_fast.steer.latent_gradient.latent_distance_gradient`.
        """
        target = self._target_for(point)
        prepared = self._prepared
        if prepared is not None and prepared.accepts(point, target):
            self._last_prepared = prepared
            return prepared.call(point)
        if target.ndim == 2 and target.shape[0] != point.shape[0]:
            raise InvalidArgumentError(
                f"target is a batch of {target.shape[0]} latents but the sample has batch "
                f"{point.shape[0]}; pass one latent [d_z] or one per sample"
            )
        g = latent_distance_gradient(self.encoder, point, target, target_name="target")
        self._prepared = self._last_prepared = _PreparedGradient.build(self.encoder, point, target)
        return g

    def _target_for(self, point: Tensor) -> Tensor:
        """The target on ``point``'s device and dtype, moved once and kept (no copy per step,
        so the step can be captured in a CUDA graph after the first call)."""
        key = (point.device, point.dtype)
        placed = self._placed.get(key)
        if placed is None:
            with torch.inference_mode(False):
                placed = self.target.to(device=point.device, dtype=point.dtype).clone()
            self._placed[key] = placed
        return placed


class _PreparedGradient:
    """The fused MLP path's native CPU call, prepared after a call that took it: a guided
    loop's every later step re-checks only what may change (sample layout, weight and
    target storage, autocast, the backend selection) and skips the public op's validation
    and dispatch (:mod:`ate_fast.ops.mlp_guidance.prepared`). Any change: the full path."""

    def __init__(self, encoder: FrozenEncoder, call: PreparedMlpGuidance, mask: Any) -> None:
        self.encoder = encoder
        self.call = call
        self.mask = mask  # the encoder's mask object when prepared (None: no mask)

    @staticmethod
    def build(encoder: FrozenEncoder, point: Tensor, target: Tensor) -> Optional[_PreparedGradient]:
        if point.device.type != "cpu":  # only the CPU kernel is prepared: no work per GPU call
            return None
        if encoder.path_for(point) != "mlp_fused" or encoder.weight_dtype != point.dtype:
            return None
        mask = encoder.mask
        if mask is not None and (mask.dtype != point.dtype or mask.device != point.device):
            return None  # the full path converts it per call; keep that path
        weights, biases = encoder.mlp_tensors()
        dz = weights[-1].shape[0] // 2
        call = prepare_mlp_guidance(
            point, weights, biases, encoder.mlp_parts[2], target=target, mask=mask,
            distance_weight=1.0 / dz,
        )  # fmt: skip
        return None if call is None else _PreparedGradient(encoder, call, mask)

    def accepts(self, point: Tensor, target: Tensor) -> bool:
        encoder = self.encoder
        return (
            encoder.mask is self.mask
            and not autocast_enabled(point)
            and encoder.mlp_plain()
            and self.call.accepts(point, *encoder.mlp_tensors(), target, self.mask)
        )


def _chain(g: Tensor, dx0_dx: Tensor, dtype: torch.dtype) -> Tensor:
    """Tweedie's chain rule: ``g`` [B, H, D] at x̂0 times the per-sample slope [B], in ``dtype``."""
    scale = dx0_dx.to(device=g.device, dtype=g.dtype).reshape(-1, 1, 1)
    return (g * scale).to(dtype)


class _CallGradient:
    """:meth:`LatentGuidance.call_gradient`'s function for one sampler call: the checked
    :meth:`LatentGuidance.gradient` at its first evaluation, then the prepared fused call
    that took (if it did) while the sample keeps its layout and the guidance that call."""

    __slots__ = ("guidance", "prepared")

    def __init__(self, guidance: LatentGuidance) -> None:
        self.guidance = guidance
        self.prepared: Optional[_PreparedGradient] = None

    def __call__(self, x: Tensor, x0_hat: Tensor, dx0_dx: Tensor) -> Tensor:
        guidance, prepared = self.guidance, self.prepared
        direct = guidance.mode == "direct"
        point = x if direct else x0_hat
        if (
            prepared is None
            or prepared is not guidance._prepared  # a new target since
            or not prepared.call.accepts_sample(point)
        ):
            g = guidance.gradient(x, x0_hat, dx0_dx)
            self.prepared = guidance._last_prepared
            return g
        g = prepared.call(point)
        if direct:  # the prepared call computes in the sample's dtype: g is x's
            return g
        check.check_per_sample("dx0_dx", dx0_dx, x.shape[0])
        return _chain(g, dx0_dx, x.dtype)
