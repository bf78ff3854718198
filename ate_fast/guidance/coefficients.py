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

from ate_fast.argument_checks import check_choice
from ate_fast.errors import ArgumentTypeError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
FLOW_CONVENTIONS = ("openpi", "paper")
DENOMINATOR_FLOOR = 1e-6


def _floating(name: str, value: object) -> Tensor:
    """``value`` as a floating tensor of float32 at least: a half type cannot hold
    ``1/DENOMINATOR_FLOOR`` (float16's largest is 65504), so ``c`` would be ±inf."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise ArgumentTypeError(f"{name} must be a floating torch.Tensor [B], got {got}")
    return value if value.dtype in (torch.float32, torch.float64) else value.float()


def diffusion_guidance_coefficient(alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """``c`` for a diffusion model; ``alpha_bar`` is ᾱ ∈ [0, 1] at each sample's step,
    [B] -> [B] (float32 for a half-precision ᾱ; ᾱ is not range-checked: that would cost
    a host sync inside a training step)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    ab = _floating("alpha_bar", alpha_bar)
    if prediction_type == "epsilon":
        return -torch.sqrt(1.0 - ab)
    sqrt_ab = torch.sqrt(ab).clamp_min(DENOMINATOR_FLOOR)
    if prediction_type == "sample":
        return (1.0 - ab) / sqrt_ab
    return -torch.sqrt(1.0 - ab) / sqrt_ab


def flow_guidance_coefficient(t: Tensor, convention: str = "openpi") -> Tensor:
    """``c`` for a flow-matching velocity model, [B] -> [B] (float32 for a half-precision
    ``t``; ``t`` ∈ [0, 1] is not range-checked: that would cost a host sync).

    ``convention="openpi"``: ``t`` is the noise level (x_t = t·ε + (1−t)·a0), c = −t/(1−t).
    ``convention="paper"``: ``t`` is τ, the data level (a^τ = τ·a0 + (1−τ)·ε), c = (1−τ)/τ.
    """
    check_choice("convention", convention, FLOW_CONVENTIONS)
    t = _floating("t", t)
    if convention == "openpi":
        return -t / (1.0 - t).clamp_min(DENOMINATOR_FLOOR)
    return (1.0 - t) / t.clamp_min(DENOMINATOR_FLOOR)
