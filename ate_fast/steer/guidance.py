"""The protocol between inference-time guidance and the samplers.

A sampler that is given ``guidance`` corrects the model output at every step as
ATE_METHOD.md's "Inference-time steering" prescribes::

    g = guidance.gradient(x, x0_hat, dx0_dx)
    model_out ← model_out + guidance.scale · clamp(c · g, −guidance.clamp, guidance.clamp)

with ``c`` the guidance coefficient of the sampler's parameterisation at that step
(:mod:`ate_fast.steer.coefficients`), then takes its ordinary update (through
:func:`ate_fast.ops.guided_step`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

GUIDANCE_MODES = ("direct", "tweedie")


@runtime_checkable
class Guidance(Protocol):
    """What a sampler needs from a guidance object.

    Attributes:
        scale: λ.
        clamp: κ (``math.inf``: no clamp).
        mode: ``"direct"`` — ``g`` is taken at ``x``; ``"tweedie"`` — at the sampler's
            estimate ``x0_hat`` of the clean chunk, times the scalar ∂x̂0/∂x.
    """

    scale: float
    clamp: float
    mode: str

    def gradient(self, x: Tensor, x0_hat: Tensor, dx0_dx: Tensor) -> Tensor:
        """``g = ∇_x y`` [B, H, D] for the current sample ``x`` [B, H, D].

        ``x0_hat`` [B, H, D] is the sampler's clean-chunk estimate at this step and
        ``dx0_dx`` [B] the schedule's scalar ∂x̂0/∂x with the model output held fixed (1/√ᾱ
        for ε-prediction, √ᾱ for v-prediction, 1 for a flow model's ``x − t·v``);
        ``"direct"`` ignores both.
        No gradient flows through the policy.
        """
        ...
