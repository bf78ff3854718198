"""Flow-matching ODE samplers (openpi / diffusers convention: x_t = t·ε + (1−t)·a0).

The model predicts the velocity ``v = ε − a0``; integrating dx/dt = v from t = 1
(noise) to t = 0 (actions) with a descending grid ``t_0 = 1 > … > t_K = 0``:

=====  ===========================================================================
Euler  x' = x + Δt·v̂(x, t)                      (one guided_step: a = 1, b = Δt < 0)
Heun   x̃ = x + Δt·v̂(x, t);  x' = ½x + ½x̃ + ½Δt·v̂(x̃, t')    (two guided_steps);
       the last step (to t = 0, where the model is not evaluated) is Euler, as in
       diffusers' FlowMatchHeunDiscreteScheduler
=====  ===========================================================================

with ``v̂ = v + λ·clip(c·g, −κ, κ)``, ``c = −t/(1−t)`` and, for the guidance,
``x0_hat = x − t·v``, ``dx0/dx = 1``. A ``"policy_vjp"`` guidance (real-time chunking,
:class:`ate_fast.realtime.RTCGuidance`) gets ``g`` through the model,
``g = u − t·(∂v/∂x)ᵀu``, and may replace ``c`` by its own ``coefficient(t)`` per step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import Guidance, flow_guidance_coefficient
from ate_fast.sampling.sampler import ModelFn, Run, Sampler
from ate_fast.sampling.timesteps import FLOW_TIME_GRIDS, flow_sigmas

FLOW_METHODS = ("euler", "heun")


def _coefficient(t: np.ndarray) -> np.ndarray:
    return flow_guidance_coefficient(torch.from_numpy(t), "openpi").numpy()


class FlowSampler(Sampler):
    """Euler or Heun integration of a flow-matching (rectified flow) action head.

    With ``time_grid="diffusers"`` and ``method="euler"`` the unguided result matches
    diffusers' ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`` loop step
    for step (``method="heun"``: ``FlowMatchHeunDiscreteScheduler``'s), with the model
    called at ``t = σ`` (the scheduler's timestep / num_train_timesteps).

    Args:
        model_fn: ``model_fn(x [B,H,D], t [B], cond) -> velocity [B,H,D]``; ``t`` in
            (0, 1] (1 = pure noise), float32 (float64 for float64 data).
        num_steps: 1 ≤ K ≤ MAX_NUM_STEPS (10,000) steps (Euler: K model evaluations; Heun:
            2K − 1); above the bound LimitExceededError.
        method: ``"euler"`` or ``"heun"``.
        time_grid: ``"uniform"`` (openpi: t = 1, 1 − 1/K, …, 1/K) or ``"diffusers"``
            (FlowMatchEulerDiscreteScheduler's grid, with ``shift``).
        shift: the diffusers grid's timestep shift (SD3's ``shift·σ/(1 + (shift−1)·σ)``);
            must stay 1.0 with the uniform grid.
        num_train_timesteps: the diffusers grid's resolution (its smallest σ is
            ``1/num_train_timesteps`` before shifting).
    """

    supports_inpainting = True

    def __init__(
        self,
        model_fn: ModelFn,
        num_steps: int = 10,
        method: str = "euler",
        time_grid: str = "uniform",
        shift: float = 1.0,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__(model_fn, num_steps)
        self.method = check_choice("method", method, FLOW_METHODS)
        self.time_grid = check_choice("time_grid", time_grid, FLOW_TIME_GRIDS)
        check_float("shift", shift, 0.0, above=True)
        if time_grid == "uniform" and shift != 1.0:
            raise InvalidArgumentError(f"shift={shift} applies to time_grid='diffusers' only")
        check_int("num_train_timesteps", num_train_timesteps, 2)
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

        sig = flow_sigmas(self.num_steps, time_grid, self.shift, num_train_timesteps)
        t, t_next = sig[:-1], sig[1:]
        if not (np.all(t > 0) and np.all(t <= 1) and np.all(np.diff(sig) < 0)):
            raise InvalidArgumentError(
                f"the {time_grid!r} grid for num_steps={self.num_steps}, shift={shift}, "
                f"num_train_timesteps={num_train_timesteps} leaves (0, 1] or is not "
                f"decreasing: {sig.tolist()}"
            )
        self.times = sig
        dt = t_next - t
        ones = np.ones_like(t)
        # Stage 2 of Heun evaluates at t_next; its last entry (t = 0) is never used.
        t2 = np.append(t_next[:-1], t[-1])
        self.coefficient_tables = {
            "one": ones, "half": 0.5 * ones, "dt": dt, "half_dt": 0.5 * dt,
            "neg_t": -t, "c": _coefficient(t), "neg_t2": -t2, "c2": _coefficient(t2),
        }  # fmt: skip
        self.model_times = {"t": t, "t2": t2}
        self.step_noise_draws = np.zeros(self.num_steps, dtype=bool)  # an ODE: no noise

    def __repr__(self) -> str:
        return (
            f"FlowSampler(num_steps={self.num_steps}, method={self.method!r}, "
            f"time_grid={self.time_grid!r}, shift={self.shift})"
        )

    def _check_guidance_mode(self, guidance: Guidance, mode: str) -> None:
        if not hasattr(guidance, "coefficient"):
            return
        convention = getattr(guidance, "convention", None)
        if convention != "openpi":
            raise InvalidArgumentError(
                f"guidance.convention is {convention!r} but FlowSampler integrates in the "
                "'openpi' convention (t = 1 noise -> t = 0 actions, v = noise - actions): "
                "build the guidance with convention='openpi' (its coefficient(t) is read "
                "at FlowSampler's times)"
            )
        self.guidance_coefficients(guidance)  # raises now for a bad coefficient table

    def guidance_coefficients(self, guidance: Optional[Guidance]) -> dict[str, np.ndarray]:
        """``{"c": ..., "c2": ...}`` from a guidance's own ``coefficient(t)`` (RTC's) at the
        model times ``t`` and ``t2`` (Heun's second stage); {} for one without it."""
        if guidance is None or not hasattr(guidance, "coefficient"):
            return {}
        return {
            c: self._coefficient_table(guidance, self.model_times[t])
            for c, t in (("c", "t"), ("c2", "t2"))
        }

    @staticmethod
    def _coefficient_table(guidance: Guidance, t: np.ndarray) -> np.ndarray:
        table = guidance.coefficient(t.copy())  # type: ignore[attr-defined]
        if not isinstance(table, np.ndarray):
            raise ArgumentTypeError(
                f"guidance.coefficient(t) must return a numpy array, got {type(table).__name__}"
            )
        table = np.asarray(table, dtype=np.float64)
        if table.shape != t.shape or not np.all(np.isfinite(table)):
            raise InvalidArgumentError(
                f"guidance.coefficient(t) must return {t.shape[0]} finite values (one per "
                f"step of t [K]), got shape {table.shape}"
            )
        return table

    def loop(self, run: Run) -> None:
        tb, x, launch = run.tables, run.x, run.launch
        last = self.num_steps - 1
        for k in range(self.num_steps):
            v, g = run.evaluate(x, tb.t[k], tb.one[k], tb.neg_t[k], tb.one[k])
            if self.method == "euler" or k == last:
                launch(x, x=x, m=v, a=tb.one[k], b=tb.dt[k], g=g, c=tb.c[k])
            else:
                x_pred = run.ws["x_pred"]
                launch(x_pred, x=x, m=v, a=tb.one[k], b=tb.dt[k], g=g, c=tb.c[k])
                v2, g2 = run.evaluate(x_pred, tb.t2[k], tb.one[k], tb.neg_t2[k], tb.one[k])
                launch(
                    x, x=x, m=v2, a=tb.half[k], b=tb.half_dt[k], g=g2, c=tb.c2[k],
                    m_prev=x_pred, d=tb.half[k],
                )  # fmt: skip
            run.step_done(k)
