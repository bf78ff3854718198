"""Discrete-time diffusion samplers matching diffusers' DDPM, DDIM and DPM-Solver++ loops.

Each step's update is linear in the sample ``x`` and the (guided) model output
``m̂ = m + λ·clip(c·g, −κ, κ)``, so it is one fused :func:`ate_fast.guided_step`:

=========================  ================================================================
DDPM (fixed_small)         x' = (cₓ₀·p + cₓ)·x + cₓ₀·q·m̂ + σ·z      (posterior mean + noise)
DDIM                       x' = (√ᾱ'·p + δ·u)·x + (√ᾱ'·q + δ·w)·m̂ + σ·z,  δ = √(1−ᾱ'−σ²)
DPM-Solver++ (multistep)   x̂0 = p·x + q·m̂  (conversion), then
                           x' = (σ'/σ)·x + β₀·x̂0 + β₁·x̂0_prev [+ β₂·x̂0_prev2]
=========================  ================================================================

where ``x0 = p·x + q·m`` and ``ε = u·x + w·m`` are the prediction type's estimates.
With ``clip_sample`` the clipped x0 needs its own buffer: x0 = p·x + q·m̂, clamp, then
the update reads it through the op's ``m_prev`` slot (two calls).

All coefficients are computed once, in float64, from the schedule's ᾱ (diffusers'
float32 values), and replayed as ``[B]`` rows.

Cancellation: from a timestep with tiny ᾱ (the cosine schedule's last one, ᾱ ≈ 2e-9),
an ε-model's step has ``a ≈ −b ≈ 3e3`` and ``x ≈ m``; ``a·x + b·m`` in float32 then
loses ~1e-3 of the result to the rounding of ``a`` and ``b`` alone. Such steps
(``|a| + |b| > 8·|a + b|``) are issued as ``a·(x − m̂) + (a + b)·m̂`` — two fused calls,
where ``x − m̂`` is exact for close values — which is more accurate than diffusers'
own float32 loop there.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import (
    POLICY_VJP,
    PREDICTION_TYPES,
    SCALAR_SLOPE_MODES,
    Guidance,
    diffusion_guidance_coefficient,
)
from ate_fast.sampling.sampler import ModelFn, Run, Sampler
from ate_fast.sampling.schedule import NoiseSchedule
from ate_fast.sampling.timesteps import (
    DEFAULT_SPACING,
    DIFFUSION_METHODS,
    TIMESTEP_SPACINGS,
    diffusion_timesteps,
)

# A step whose x- and m-coefficients cancel beyond this ratio is split (module docstring).
SPLIT_RATIO = 8.0
# DDPM's variance is clamped here before its square root (diffusers' _get_variance).
_DDPM_MIN_VARIANCE = 1e-20
SOLVER_ORDERS = (1, 2, 3)
# DPM-Solver++ lowers its order near the end for runs shorter than this (diffusers).
_DPM_LOWER_ORDER_BELOW = 15


def _x0_map(prediction_type: str, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, q) with x0 = p·x + q·m for the prediction type at ᾱ = ``ab``."""
    if prediction_type == "epsilon":
        return 1.0 / np.sqrt(ab), -np.sqrt(1.0 - ab) / np.sqrt(ab)
    if prediction_type == "sample":
        return np.zeros_like(ab), np.ones_like(ab)
    return np.sqrt(ab), -np.sqrt(1.0 - ab)  # v_prediction


def _eps_map(prediction_type: str, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, w) with ε = u·x + w·m for the prediction type at ᾱ = ``ab``."""
    if prediction_type == "epsilon":
        return np.zeros_like(ab), np.ones_like(ab)
    if prediction_type == "sample":
        return 1.0 / np.sqrt(1.0 - ab), -np.sqrt(ab) / np.sqrt(1.0 - ab)
    return np.sqrt(1.0 - ab), np.sqrt(ab)  # v_prediction


def _split(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, b') for x' = a·x + b·m: where the two terms cancel, b' = a + b so that the
    step can be issued as a·(x − m) + b'·m; elsewhere b' = b."""
    mask = np.abs(a) + np.abs(b) > SPLIT_RATIO * np.abs(a + b)
    return mask, np.where(mask, a + b, b)


def _guidance_coefficient(ab: np.ndarray, prediction_type: str) -> np.ndarray:
    return diffusion_guidance_coefficient(torch.from_numpy(ab), prediction_type).numpy()


class DiffusionSampler(Sampler):
    """DDPM, DDIM or DPM-Solver++ sampling of a discrete-time diffusion action head.

    The unguided result matches ``diffusers``' ``DDPMScheduler`` (``variance_type=
    "fixed_small"``), ``DDIMScheduler`` and ``DPMSolverMultistepScheduler``
    (``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``,
    ``final_sigmas_type="zero"``) configured with the same arguments, step for step,
    including how step noise consumes the generator.

    Args:
        model_fn: ``model_fn(x [B,H,D], t [B] int64 training timesteps, cond) -> [B,H,D]``.
        schedule: the :class:`NoiseSchedule` the model was trained with.
        method: ``"ddpm"``, ``"ddim"`` or ``"dpmsolver++"``.
        num_steps: K ≥ 1 model evaluations (≤ the schedule's num_train_timesteps and ≤
            MAX_NUM_STEPS = 10,000, else LimitExceededError).
        prediction_type: what the model predicts: ``"epsilon"``, ``"sample"`` (x0) or
            ``"v_prediction"``.
        timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``; None picks
            diffusers' default for the method (leading for DDPM/DDIM, linspace for
            DPM-Solver++).
        steps_offset: added to the timesteps with ``"leading"`` spacing.
        set_alpha_to_one: DDIM's final step goes to ᾱ = 1 (else to ᾱ₀).
        clip_sample, clip_sample_range: clamp the x0 estimate to ±range (DDPM, DDIM).
        eta: DDIM's noise weight η ≥ 0 (0 = deterministic; 1 = DDPM-like variance).
        solver_order: DPM-Solver++'s multistep order, 1, 2 or 3.
        lower_order_final: DPM-Solver++ lowers the order of the last steps when K < 15.

    Options that do not apply to ``method`` must keep their defaults (a ValueError
    names the one that does not).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: NoiseSchedule,
        method: str = "ddim",
        num_steps: int = 10,
        prediction_type: str = "epsilon",
        timestep_spacing: Optional[str] = None,
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        eta: float = 0.0,
        solver_order: int = 2,
        lower_order_final: bool = True,
    ) -> None:
        super().__init__(model_fn, num_steps)
        if not isinstance(schedule, NoiseSchedule):
            raise ArgumentTypeError(
                f"schedule must be a NoiseSchedule, got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self.method = check_choice("method", method, DIFFUSION_METHODS)
        self.prediction_type = check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if timestep_spacing is None:
            timestep_spacing = DEFAULT_SPACING[method]
        self.timestep_spacing = check_choice(
            "timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS
        )
        check_int("steps_offset", steps_offset, 0)
        check_float("clip_sample_range", clip_sample_range, 0.0, above=True)
        check_float("eta", eta, 0.0)
        check_choice("solver_order", solver_order, SOLVER_ORDERS)
        self._check_applicable(
            set_alpha_to_one=(set_alpha_to_one, True, ("ddim",)),
            eta=(eta, 0.0, ("ddim",)),
            clip_sample=(clip_sample, False, ("ddpm", "ddim")),
            clip_sample_range=(clip_sample_range, 1.0, ("ddpm", "ddim")),
            solver_order=(solver_order, 2, ("dpmsolver++",)),
            lower_order_final=(lower_order_final, True, ("dpmsolver++",)),
        )
        self.steps_offset = steps_offset
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.eta = float(eta)
        self.solver_order = int(solver_order)
        self.lower_order_final = bool(lower_order_final)

        self.timesteps = diffusion_timesteps(
            method,
            self.num_steps,
            schedule.num_train_timesteps,
            self.timestep_spacing,
            steps_offset,
        )
        ac = schedule.alphas_cumprod.numpy()
        ab = ac[self.timesteps]
        p, q = _x0_map(prediction_type, ab)
        # Per-step rows shared by every method: the x0 estimate, its slope, c.
        # x0 = p·x + q·m̂ as issued (clip_sample, DPM-Solver++'s conversion): split if cancelling.
        self._x0_split, q_issued = _split(p, q)
        self.coefficient_tables = {
            "p": p, "q": q, "dx0_dx": p, "c": _guidance_coefficient(ab, prediction_type),
            "q_issued": q_issued, "one": np.ones_like(p), "minus_one": -np.ones_like(p),
        }  # fmt: skip
        self._split = np.zeros(len(ab), dtype=bool)
        self.model_times = {"t": self.timesteps}
        if method == "ddpm":
            self._plan_ddpm(ac, ab, p, q)
        elif method == "ddim":
            self._plan_ddim(ac, ab, p, q)
        else:
            self._plan_dpmsolver(ab, p, q)

    def _check_applicable(self, **options: tuple) -> None:
        for name, (value, default, methods) in options.items():
            if self.method not in methods and value != default:
                raise InvalidArgumentError(
                    f"{name}={value!r} does not apply to method={self.method!r} "
                    f"(only to {', '.join(methods)})"
                )

    def _check_guidance_mode(self, guidance: Guidance, mode: str) -> None:
        if mode == POLICY_VJP:
            raise InvalidArgumentError(
                f"guidance.mode={POLICY_VJP!r} ({type(guidance).__name__}) backpropagates "
                "through a flow policy's velocity and is applied by FlowSampler only; "
                "DiffusionSampler does not support it (use a FlowSampler, or a guidance with "
                f"mode in {SCALAR_SLOPE_MODES})"
            )
        if hasattr(guidance, "coefficient"):
            # RTC's weight −min(β, w(t)) is defined at flow times: applying this sampler's
            # ATE coefficient instead would be a different guidance, silently
            raise InvalidArgumentError(
                f"guidance ({type(guidance).__name__}) brings its own per-step coefficient(t) "
                "at flow-matching times (real-time chunking), which only FlowSampler applies; "
                "DiffusionSampler would replace it by its own ATE coefficient. Use a "
                "FlowSampler for real-time chunking"
            )
        if mode == "tweedie" and self.prediction_type == "sample":
            raise InvalidArgumentError(
                "guidance.mode='tweedie' is undefined for prediction_type='sample': x0_hat is "
                "the model output itself, so without backpropagating through the policy its "
                f"derivative is 0; use mode='direct' (modes: {SCALAR_SLOPE_MODES})"
            )

    def __repr__(self) -> str:
        # every setting that changes the update (defaults left out; DPM-Solver++'s order
        # always shown): an exported graph's metadata records this as what it computes
        defaults = {
            "steps_offset": 0, "set_alpha_to_one": True, "eta": 0.0, "clip_sample": False,
            "clip_sample_range": 1.0, "lower_order_final": True,
        }  # fmt: skip
        shown = [(n, getattr(self, n)) for n, d in defaults.items() if getattr(self, n) != d]
        if self.method == "dpmsolver++":
            shown.insert(0, ("solver_order", self.solver_order))
        extra = "".join(f", {name}={value!r}" for name, value in shown)
        return (
            f"DiffusionSampler(method={self.method!r}, num_steps={self.num_steps}, "
            f"prediction_type={self.prediction_type!r}, timestep_spacing="
            f"{self.timestep_spacing!r}{extra}, schedule={self.schedule!r})"
        )

    # -- host-side plans -----------------------------------------------------------------
    def _plan_ddpm(self, ac, ab, p, q) -> None:
        ts = self.timesteps
        prev = np.append(ts[1:], -1)
        abp = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0)
        alpha_t = ab / abp
        beta_t = 1.0 - alpha_t
        c_x0 = np.sqrt(abp) * beta_t / (1.0 - ab)  # posterior mean: c_x0·x0 + c_x·x
        c_x = np.sqrt(alpha_t) * (1.0 - abp) / (1.0 - ab)
        variance = np.maximum((1.0 - abp) / (1.0 - ab) * beta_t, _DDPM_MIN_VARIANCE)
        # diffusers draws noise only when the current timestep is > 0.
        self.step_noise_draws = ts > 0
        sigma = np.where(self.step_noise_draws, np.sqrt(variance), 0.0)
        if self.clip_sample:
            self.coefficient_tables.update(a=c_x, b=c_x0, s=sigma)
        else:
            a = c_x0 * p + c_x
            self._split, b = _split(a, c_x0 * q)
            self.coefficient_tables.update(a=a, b=b, s=sigma)

    def _plan_ddim(self, ac, ab, p, q) -> None:
        ts = self.timesteps
        n = self.schedule.num_train_timesteps
        prev = ts - n // self.num_steps  # DDIM's previous timestep, whatever the spacing
        final = 1.0 if self.set_alpha_to_one else ac[0]
        abp = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        variance = (1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp)
        sigma = self.eta * np.sqrt(variance)
        direction = 1.0 - abp - sigma**2
        if np.any(direction < 0):
            raise InvalidArgumentError(
                f"eta={self.eta} is too large: the DDIM direction term √(1−ᾱ'−σ²) is imaginary"
            )
        delta = np.sqrt(direction)
        u, w = _eps_map(self.prediction_type, ab)
        self.step_noise_draws = np.full(len(ts), self.eta > 0)
        if self.clip_sample:
            # x' = δu·x + δw·m̂ + √ᾱ'·clip(x0) + σz (ε is the unclipped estimate, as diffusers)
            self.coefficient_tables.update(a=delta * u, b=delta * w, d=np.sqrt(abp), s=sigma)
        else:
            a = np.sqrt(abp) * p + delta * u
            self._split, b = _split(a, np.sqrt(abp) * q + delta * w)
            self.coefficient_tables.update(a=a, b=b, s=sigma)

    def _plan_dpmsolver(self, ab, p, q) -> None:
        k = self.num_steps
        alpha = np.sqrt(ab)
        sigma = np.sqrt(1.0 - ab)
        half_log_snr = np.log(alpha) - np.log(sigma)  # half log-SNR
        # The step after the last lands on σ = 0 (final_sigmas_type="zero"): x' = x̂0.
        alpha_next = np.append(alpha[1:], 1.0)
        sigma_next = np.append(sigma[1:], 0.0)
        orders = np.zeros(k, dtype=np.int64)
        coef = {name: np.zeros(k) for name in ("a", "b", "d", "s")}
        for i in range(k):
            lower_final = i == k - 1  # always: the final σ is zero
            lower_second = i == k - 2 and self.lower_order_final and k < _DPM_LOWER_ORDER_BELOW
            history = min(i, self.solver_order)
            if self.solver_order == 1 or history < 1 or lower_final:
                order = 1
            elif self.solver_order == 2 or history < 2 or lower_second:
                order = 2
            else:
                order = 3
            orders[i] = order
            if i == k - 1:
                coef["a"][i], coef["b"][i] = 0.0, 1.0  # exp(−h) = 0, σ' = 0, α' = 1
                continue
            h = half_log_snr[i + 1] - half_log_snr[i]
            e = -alpha_next[i] * np.expm1(-h)  # −α'(e^{−h} − 1) > 0
            coef["a"][i] = sigma_next[i] / sigma[i]
            # Each D is a combination of the data predictions [x̂0_i, x̂0_{i−1}, x̂0_{i−2}].
            if order == 1:
                total = np.array([e, 0.0, 0.0])
            elif order == 2:
                r0 = (half_log_snr[i] - half_log_snr[i - 1]) / h
                d1 = np.array([1.0, -1.0, 0.0]) / r0
                total = e * np.array([1.0, 0.0, 0.0]) + 0.5 * e * d1
            else:
                r0 = (half_log_snr[i] - half_log_snr[i - 1]) / h
                r1 = (half_log_snr[i - 1] - half_log_snr[i - 2]) / h
                d1_0 = np.array([1.0, -1.0, 0.0]) / r0
                d1_1 = np.array([0.0, 1.0, -1.0]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                em1 = np.expm1(-h)
                total = (
                    e * np.array([1.0, 0.0, 0.0])
                    + alpha_next[i] * (em1 / h + 1.0) * d1
                    - alpha_next[i] * ((em1 + h) / h**2 - 0.5) * d2
                )
            coef["b"][i], coef["d"][i], coef["s"][i] = total
        self._orders = orders
        self.step_noise_draws = np.zeros(k, dtype=bool)
        self.coefficient_tables.update(coef)

    # -- the loop ------------------------------------------------------------------------
    def loop(self, run: Run) -> None:
        if self.method == "dpmsolver++":
            self._loop_dpmsolver(run)
        else:
            self._loop_ddpm_ddim(run)

    def _combine(self, run: Run, out, x, m, a, b, g, c, split: bool, z=None, s=None) -> None:
        """out = a·x + b·m̂ (+ s·z); a split step computes a·(x − m̂) + b·m̂ (b = a + b)."""
        tb = run.tables
        if split:
            diff = run.ws["x_minus_m"]
            run.launch(diff, x=x, m=m, a=tb.one[0], b=tb.minus_one[0], g=g, c=c)
            x = diff
        run.launch(out, x=x, m=m, a=a, b=b, g=g, c=c, z=z, s=s)

    def _loop_ddpm_ddim(self, run: Run) -> None:
        tb, x, ws, launch = run.tables, run.x, run.ws, run.launch
        clip = self.clip_sample
        r = self.clip_sample_range
        for k in range(self.num_steps):
            m, g = run.evaluate(x, tb.t[k], tb.p[k], tb.q[k], tb.dx0_dx[k])
            z = run.noise() if self.step_noise_draws[k] else None
            s = tb.s[k] if z is not None else None
            if clip:
                x0 = ws["x0"]
                self._combine(run, x0, x, m, tb.p[k], tb.q_issued[k], g, tb.c[k], self._x0_split[k])
                x0.clamp_(-r, r)
                if self.method == "ddpm":
                    launch(x, x=x, m=x0, a=tb.a[k], b=tb.b[k], z=z, s=s)
                else:
                    launch(
                        x, x=x, m=m, a=tb.a[k], b=tb.b[k], g=g, c=tb.c[k],
                        m_prev=x0, d=tb.d[k], z=z, s=s,
                    )  # fmt: skip
            else:
                self._combine(run, x, x, m, tb.a[k], tb.b[k], g, tb.c[k], self._split[k], z, s)
            run.step_done(k)

    def _loop_dpmsolver(self, run: Run) -> None:
        tb, x, ws, launch = run.tables, run.x, run.ws, run.launch
        n = self.solver_order
        for k in range(self.num_steps):
            m, g = run.evaluate(x, tb.t[k], tb.p[k], tb.q[k], tb.dx0_dx[k])
            # Data predictions rotate through `solver_order` buffers.
            x0 = ws[f"x0_{k % n}"]
            self._combine(run, x0, x, m, tb.p[k], tb.q_issued[k], g, tb.c[k], self._x0_split[k])
            order = self._orders[k]
            prev = ws[f"x0_{(k - 1) % n}"] if order >= 2 else None
            prev2 = ws[f"x0_{(k - 2) % n}"] if order >= 3 else None
            launch(
                x, x=x, m=x0, a=tb.a[k], b=tb.b[k],
                m_prev=prev, d=tb.d[k] if prev is not None else None,
                z=prev2, s=tb.s[k] if prev2 is not None else None,
            )  # fmt: skip
            run.step_done(k)
