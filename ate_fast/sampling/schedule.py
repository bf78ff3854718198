"""Discrete diffusion noise schedules, value for value the ones diffusers builds.

A model trained with diffusers' ``add_noise`` saw diffusers' float32 ``alphas_cumprod``;
sampling (and the steer losses) must use exactly those values. :class:`NoiseSchedule`
therefore computes the betas and their cumulative product with the same float32
arithmetic as ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler``
and holds the results in float64, so that every coefficient derived from them
afterwards is computed without further rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import InvalidArgumentError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers caps the cosine schedule's betas here (betas_for_alpha_bar's max_beta).
COSINE_MAX_BETA = 0.999


def _cosine_alpha_bar(t: float) -> float:
    """Improved-DDPM cosine ᾱ(t), t in [0, 1] (Nichol & Dhariwal, s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_betas(num_train_timesteps: int) -> Tensor:
    n = num_train_timesteps
    betas = [
        min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), COSINE_MAX_BETA)
        for i in range(n)
    ]
    return torch.tensor(betas, dtype=torch.float32)


class NoiseSchedule:
    """The forward process ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` of a discrete-time diffusion model.

    Args:
        beta_schedule: ``"linear"`` (DDPM), ``"scaled_linear"`` (latent diffusion) or
            ``"squaredcos_cap_v2"`` (cosine; Diffusion Policy's choice).
        num_train_timesteps: N, the number of training timesteps (t in 0..N−1).
        beta_start, beta_end: end points of the (scaled) linear schedules; unused by
            the cosine schedule.

    Attributes:
        betas, alphas, alphas_cumprod: ``[N]`` float64 tensors on the CPU holding
            exactly diffusers' float32 values for the same arguments (ᾱ = ``alphas_cumprod``).

    The defaults are diffusers'. Diffusion Policy uses
    ``NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)``.
    """

    def __init__(
        self,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ) -> None:
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 2)
        if beta_schedule != "squaredcos_cap_v2":
            check_float("beta_start", beta_start)
            check_float("beta_end", beta_end)
            if not (0.0 < beta_start < 1.0):
                raise InvalidArgumentError(f"beta_start must be in (0, 1), got {beta_start}")
            if not (0.0 < beta_end < 1.0):
                raise InvalidArgumentError(f"beta_end must be in (0, 1), got {beta_end}")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)

        n = num_train_timesteps
        if beta_schedule == "linear":
            betas32 = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas32 = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas32 = _cosine_betas(n)
        alphas32 = 1.0 - betas32
        # float32 cumulative product on the CPU, as diffusers computes it.
        cumprod32 = torch.cumprod(alphas32, dim=0)
        self.betas: Tensor = betas32.double()
        self.alphas: Tensor = alphas32.double()
        self.alphas_cumprod: Tensor = cumprod32.double()

    def __repr__(self) -> str:
        extra = "" if self.beta_schedule == "squaredcos_cap_v2" else (
            f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        )  # fmt: skip
        return (
            f"NoiseSchedule({self.beta_schedule!r}, "
            f"num_train_timesteps={self.num_train_timesteps}{extra})"
        )
