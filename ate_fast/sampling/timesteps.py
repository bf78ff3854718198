"""The inference timestep grids, built with diffusers' arithmetic so the grids are identical.

Diffusion: integer training timesteps, descending, per method and ``timestep_spacing``
(Table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").
DPM-Solver++ spaces K+1 points and drops the last, as ``DPMSolverMultistepScheduler``
does; DDPM and DDIM space K points.

Flow: the noise levels σ (= t, the openpi time; t = 1 is pure noise), descending, with
a final 0 appended: ``"uniform"`` is openpi's grid, ``"diffusers"`` is
``FlowMatchEulerDiscreteScheduler``'s (its float32 arithmetic included, shift applied
as it applies it).
"""

from __future__ import annotations

import numpy as np

from ate_fast.errors import InvalidArgumentError

DIFFUSION_METHODS = ("ddpm", "ddim", "dpmsolver++")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' default spacing per scheduler class.
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmsolver++": "linspace"}
FLOW_TIME_GRIDS = ("uniform", "diffusers")


def diffusion_timesteps(
    method: str, num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """Descending int64 training timesteps ``[num_steps]`` that ``method`` evaluates the model at.

    Raises InvalidArgumentError naming ``steps_offset`` / ``num_steps`` when a timestep
    would fall outside ``[0, num_train_timesteps)`` or appear twice (DPM-Solver++'s K + 1
    points with ``"linspace"`` / ``"leading"`` at K = N).
    """
    n, k = num_train_timesteps, num_steps
    if k > n:
        raise InvalidArgumentError(
            f"num_steps ({k}) must be <= the schedule's num_train_timesteps ({n}): "
            "the model only knows timesteps 0..N-1"
        )
    # DPM-Solver++ places K+1 points (the last one is the final x0) where DDPM/DDIM place K.
    points = k + 1 if method == "dpmsolver++" else k
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, points).round()[::-1]
    elif spacing == "leading":
        ratio = n // points
        ts = (np.arange(0, points) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = n / k
        ts = np.round(np.arange(n, 0, -ratio)) - 1
    else:  # validated by the sampler; kept for direct callers
        raise InvalidArgumentError(
            f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}"
        )
    ts = np.ascontiguousarray(ts).astype(np.int64)
    if method == "dpmsolver++" and spacing != "trailing":
        ts = ts[:-1]
    if len(ts) != k:
        raise InvalidArgumentError(
            f"timestep_spacing={spacing!r} gives {len(ts)} timesteps for num_steps={k} and "
            f"num_train_timesteps={n}; choose another spacing or number of steps"
        )
    if k > 1 and (np.diff(ts) >= 0).any():  # a repeated timestep: a step of size h = 0
        t = int(ts[:-1][np.diff(ts) >= 0][0])
        raise InvalidArgumentError(
            f"num_steps={k} repeats timestep {t} with method={method!r}, "
            f"timestep_spacing={spacing!r} and num_train_timesteps={n} (a step of length 0, "
            "whose coefficients are not finite); choose fewer steps or another spacing"
        )
    if ts.max() >= n or ts.min() < 0:
        raise InvalidArgumentError(
            f"steps_offset={steps_offset} puts a timestep at {int(ts.max())}, outside the "
            f"trained range [0, {n - 1}]"
        )
    return ts


def _shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's timestep shift, in the precision of ``sigmas`` (float32 or float64).

    Like torch's ``tensor * python_float``, the scalars ``shift`` and ``shift − 1`` are
    formed in double precision and rounded to the array's precision once.
    """
    dtype = sigmas.dtype.type
    return dtype(shift) * sigmas / (dtype(1.0) + dtype(shift - 1.0) * sigmas)


def flow_sigmas(
    num_steps: int, time_grid: str, shift: float, num_train_timesteps: int
) -> np.ndarray:
    """``[num_steps + 1]`` float64 noise levels, descending from ≤ 1 to exactly 0.

    ``"uniform"``: ``1, 1−1/K, …, 1/K, 0`` (openpi). ``"diffusers"``: the float32 grid
    of ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(K)``
    (which shifts its end points, then the interpolated grid, with ``shift``).
    """
    k = num_steps
    if time_grid == "uniform":
        sig = 1.0 - np.arange(k + 1, dtype=np.float64) / k
        sig[-1] = 0.0
        return sig
    n = num_train_timesteps
    # The training grid, in float32 as the scheduler's constructor builds it.
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train = _shifted(train.astype(np.float32), shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    grid = np.linspace(sigma_max * n, sigma_min * n, k) / n
    grid = _shifted(grid, float(shift)).astype(np.float32)
    return np.concatenate([grid.astype(np.float64), [0.0]])
