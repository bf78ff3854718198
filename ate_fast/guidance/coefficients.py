"""The guidance coefficient ``c`` of ATE_METHOD.md (Stage 3), per parameterisation.

The steer correction is ``m + λ·clip(c·g, −κ, κ)`` (λ = ``scale``, κ = ``clamp``) with
``g = ∇_x y(x)``. ``c`` turns a score-space gradient into the model's output space
(classifier guidance):

==================  ===========================  ==========================
model predicts      target                       c
==================  ===========================  ==========================
epsilon             ε                            −√(1−ᾱ)
sample (x0)         a0                           (1−ᾱ)/√ᾱ
v_prediction        √ᾱ ε − √(1−ᾱ) a0             −√((1−ᾱ)/ᾱ)
flow, openpi        ε − a0  (t = 1 is noise)     −t/(1−t)
flow, paper         a0 − ε  (τ = 1 is data)      +(1−τ)/τ
==================  ===========================  ==========================

The flow coefficients diverge at the pure-noise end (t = 1, τ = 0), where the openpi
grid starts. The denominator is floored at :data:`DENOMINATOR_FLOOR` so that ``c`` stays
finite (``c·0`` is 0, not NaN); there the clamp makes the correction ``±κ`` anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ate_fast.errors import InvalidArgumentError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
FLOW_CONVENTIONS = ("openpi", "paper")
DENOMINATOR_FLOOR = 1e-6


def diffusion_guidance_coefficient(alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """``c`` for a diffusion model; ``alpha_bar`` is ᾱ at each sample's step, [B] -> [B]."""
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidArgumentError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    ab = alpha_bar
    if prediction_type == "epsilon":
        return -torch.sqrt(1.0 - ab)
    sqrt_ab = torch.sqrt(ab).clamp_min(DENOMINATOR_FLOOR)
    if prediction_type == "sample":
        return (1.0 - ab) / sqrt_ab
    return -torch.sqrt(1.0 - ab) / sqrt_ab


def flow_guidance_coefficient(t: Tensor, convention: str = "openpi") -> Tensor:
    """``c`` for a flow-matching velocity model, [B] -> [B].

    ``convention="openpi"``: ``t`` is the noise level (x_t = t·ε + (1−t)·a0), c = −t/(1−t).
    ``convention="paper"``: ``t`` is τ, the data level (a^τ = τ·a0 + (1−τ)·ε), c = (1−τ)/τ.
    """
    if convention == "openpi":
        return -t / (1.0 - t).clamp_min(DENOMINATOR_FLOOR)
    if convention == "paper":
        return (1.0 - t) / t.clamp_min(DENOMINATOR_FLOOR)
    raise InvalidArgumentError(f"convention must be one of {FLOW_CONVENTIONS}, got {convention!r}")
