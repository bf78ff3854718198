"""Real-time chunking as inference-time guidance (Black, Galliker, Levine, arXiv 2506.07339).

The next chunk is inpainted toward the previous one, Y [B, H, D] (aligned so that
``Y[:, i]`` is the previous plan's action for the new chunk's step i), weighted by the
soft mask W [H] (:mod:`ate_fast.realtime.prefix_schedules`). Paper convention (τ = 0 noise,
τ = 1 data, v_τ = data − noise), one flow step:

    x̂₁ = x + (1 − τ)·v(x, τ)
    g  = (∂x̂₁/∂x)ᵀ [W ⊙ (Y − x̂₁)]                     (a VJP through the policy)
    v' = v + min(β, (1 − τ)/(τ·r²_τ))·g,   r²_τ = (1 − τ)²/(τ² + (1 − τ)²)

openpi convention (t = 1 − τ, v_t = noise − data = −v_τ; FlowSampler's): the same point
x, the same clean estimate x̂₀ = x − t·v_t = x̂₁, the same g, and

    v_t' = v_t − min(β, w(t))·g,   w(t) = (t² + (1 − t)²)/(t·(1 − t))

(the weight (1 − τ)/(τ·r²_τ) = (τ² + (1 − τ)²)/(τ(1 − τ)) is symmetric in τ ↔ 1 − τ; the
correction's sign flips with the velocity's). docs/rtc.md derives it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import FLOW_CONVENTIONS, POLICY_VJP
from ate_fast.realtime.prefix_buffers import Delay, check_chunk, write_prefix
from ate_fast.realtime.prefix_schedules import check_schedule, prefix_weight_table

# The paper's guidance-weight clip β (its experiments use 5).
DEFAULT_MAX_GUIDANCE_WEIGHT = 5.0


def rtc_guidance_weight(t: np.ndarray, max_guidance_weight: float) -> np.ndarray:
    """``min(β, (t² + (1 − t)²)/(t·(1 − t)))`` [K] float64 for times ``t`` [K] in [0, 1]
    (either convention: the weight is symmetric in t ↔ 1 − t; ∞ at 0 and 1, so β there)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        w = (t * t + (1.0 - t) ** 2) / (t * (1.0 - t))
    return np.minimum(np.where(t * (1.0 - t) > 0, w, math.inf), max_guidance_weight)


class RTCGuidance:
    """Real-time chunking (implements :class:`ate_fast.Guidance`, mode ``"policy_vjp"``).

    Args:
        prev_chunk: Y [B, H, D], the previous chunk aligned to the new one, or None (call
            :meth:`set_prefix` before sampling).
        delay: d, the inference delay in steps (0 ≤ d ≤ H − s): the first d actions are
            executed before the new chunk is ready; an int or one int per sample.
        execution_horizon: s (1 ≤ s < H), the steps executed from each chunk; the mask is
            0 from step H − s on.
        max_guidance_weight: β ≥ 0, the clip on the guidance weight (paper: 5; β = 0
            turns the guidance off exactly).
        prefix_schedule: the mask between d and H − s: ``"exp"`` (paper), ``"linear"``,
            ``"ones"``, ``"zeros"``.
        convention: ``"openpi"`` (FlowSampler's) or ``"paper"``: the time convention of
            :meth:`coefficient` and :meth:`guided_velocity`.
        jacobian: True (the paper): g is the VJP through the policy (mode
            ``"policy_vjp"``, one backward pass per step). False: the policy's Jacobian is
            dropped, g = W ⊙ (Y − x̂) (mode ``"tweedie"``, no backward pass) — what
            LeRobot 0.4.4's ``RTCProcessor`` computes (it evaluates the policy before
            enabling gradients on x), so ``jacobian=False`` reproduces its chunks.

    The previous chunk and the mask live in static buffers that :meth:`set_prefix`
    overwrites in place, so one ``sampler.capture(...)`` serves every control tick and
    every delay: call ``set_prefix(Y, d)``, then the captured sampler. The buffers keep the
    first prev_chunk's shape, dtype and device. ``delays`` (int64 CPU [B]) records the
    delay last set (None after :meth:`clear_prefix`): what an exported graph's ``delay``
    input is fed (``ate_fast.export.OnnxRuntimeSampler``). ``scale`` is 1 and ``clamp`` inf (the
    weight's clip is β); β, s, the schedule and the convention are fixed at construction.
    """

    scale = 1.0
    clamp = math.inf
    mode = POLICY_VJP

    def __init__(
        self,
        prev_chunk: Optional[Tensor] = None,
        delay: Delay = 0,
        *,
        execution_horizon: int,
        max_guidance_weight: float = DEFAULT_MAX_GUIDANCE_WEIGHT,
        prefix_schedule: str = "exp",
        convention: str = "openpi",
        jacobian: bool = True,
    ) -> None:
        check_int("execution_horizon", execution_horizon, 1, 1 << 20)
        if not isinstance(jacobian, bool):
            raise ArgumentTypeError(f"jacobian must be a bool, got {type(jacobian).__name__}")
        self.mode = POLICY_VJP if jacobian else "tweedie"
        beta = check_float("max_guidance_weight", max_guidance_weight, 0.0)
        check_choice("convention", convention, FLOW_CONVENTIONS)
        self._s = int(execution_horizon)
        self._beta = beta
        self._schedule = check_schedule(prefix_schedule)
        self._convention = convention
        self.prev_chunk: Optional[Tensor] = None  # Y [B, H, D], static
        self.weights: Optional[Tensor] = None  # W [B, H, 1], static
        self._table: Optional[Tensor] = None  # [H − s + 1, H]: row d is W for delay d
        self.delays: Optional[Tensor] = None  # d per sample, int64 CPU [B] (None: cleared)
        if prev_chunk is not None:
            self.set_prefix(prev_chunk, delay)

    # read-only: a captured loop bakes them in
    execution_horizon = property(lambda self: self._s, doc="s, the execution horizon.")
    max_guidance_weight = property(lambda self: self._beta, doc="β, the weight's clip.")
    prefix_schedule = property(lambda self: self._schedule, doc="The mask's schedule.")
    convention = property(lambda self: self._convention, doc="'openpi' or 'paper'.")

    def __repr__(self) -> str:
        shape = None if self.prev_chunk is None else tuple(self.prev_chunk.shape)
        return (
            f"RTCGuidance(prev_chunk={shape}, execution_horizon={self._s}, "
            f"max_guidance_weight={self._beta}, prefix_schedule={self._schedule!r}, "
            f"convention={self._convention!r}, jacobian={self.mode == POLICY_VJP})"
        )

    # -- the previous chunk ------------------------------------------------------------
    def set_prefix(self, prev_chunk: Tensor, delay: Delay = 0, *, check_finite: bool = True):
        """Write Y = ``prev_chunk`` [B, H, D] and the mask for ``delay`` d into the static
        buffers (in place; no host sync but the optional finite check of ``prev_chunk``,
        and, on a GPU, the copy of B different per-sample delays).

        ``delay``: an int, or B ints (one per sample, a sequence or an int CPU tensor),
        each in ``0..H − s``.
        """
        prev_chunk = check_chunk(prev_chunk, check_finite)
        fresh = self.prev_chunk is None
        if fresh:
            self._allocate(prev_chunk)
        y, w, table = self.prev_chunk, self.weights, self._table
        assert y is not None and w is not None and table is not None
        why = f" (H − execution_horizon = {table.shape[1]} − {self._s})"
        try:
            delays = write_prefix("RTCGuidance", prev_chunk, delay, y, w, table, why)
        except Exception:
            if fresh:  # not armed with zero buffers: sampling then says there is no prefix
                self.prev_chunk = self.weights = self._table = None
            raise
        self.delays = torch.tensor(delays, dtype=torch.int64)

    def clear_prefix(self) -> None:
        """Zero the mask: the guidance then changes nothing (g = 0; e.g. the first tick,
        when there is no previous chunk), and a captured loop stays valid."""
        if self.weights is None:
            raise InvalidArgumentError("clear_prefix() needs a prefix: call set_prefix() first")
        self.weights.zero_()
        self.delays = None

    def _allocate(self, prev_chunk: Tensor) -> None:
        horizon = prev_chunk.shape[1]
        if self._s >= horizon:
            raise InvalidArgumentError(
                f"execution_horizon must be in [1, H − 1] = [1, {horizon - 1}] for prev_chunk's "
                f"horizon H = {horizon}, got {self._s}"
            )
        table = prefix_weight_table(horizon, self._s, self._schedule)
        like = dict(dtype=prev_chunk.dtype, device=prev_chunk.device)
        with torch.inference_mode(False):  # buffers autograd may read later
            self._table = torch.tensor(table, **like)
            self.prev_chunk = torch.zeros(prev_chunk.shape, **like)
            self.weights = torch.zeros(prev_chunk.shape[0], horizon, 1, **like)

    # -- the Guidance protocol ---------------------------------------------------------
    def gradient(self, x: Tensor, x0_hat: Tensor, dx0_dx: Optional[Tensor] = None) -> Tensor:
        """The cotangent ``u = W ⊙ (Y − x0_hat)`` [B, H, D] (= ∇_{x0_hat} of
        ``y = −½‖√W ⊙ (Y − x0_hat)‖²``); the sampler pulls it back through the policy.
        With ``jacobian=False`` (mode ``"tweedie"``) it is the gradient itself,
        ``dx0_dx·u`` with the policy held constant (``dx0_dx`` [B]; 1 for a flow).

        ``x``, ``x0_hat``: [B, H, D] (Y's shape, dtype and device).
        """
        y, w = self.prev_chunk, self.weights
        if y is None or w is None:
            raise InvalidArgumentError(
                "RTCGuidance has no previous chunk: call set_prefix(prev_chunk, delay) before "
                "sampling (or sample the first chunk without guidance)"
            )
        for name, t in (("x", x), ("x0_hat", x0_hat)):
            if t.shape != y.shape or t.dtype != y.dtype or t.device != y.device:
                raise InvalidArgumentError(
                    f"{name} must match prev_chunk: shape {tuple(y.shape)}, {y.dtype} on "
                    f"{y.device}; got {tuple(t.shape)}, {t.dtype} on {t.device} (sample with "
                    "noise shaped, typed and placed like prev_chunk)"
                )
        u = (y - x0_hat) * w
        if self.mode == POLICY_VJP or dx0_dx is None:
            return u
        return u * dx0_dx.to(device=u.device, dtype=u.dtype).reshape(-1, 1, 1)

    def coefficient(self, t: np.ndarray) -> np.ndarray:
        """The per-step ``c`` [K] float64 replacing the sampler's for model times ``t`` [K]
        in :attr:`convention`: ``−min(β, w(t))`` (openpi) or ``+min(β, w(τ))`` (paper)."""
        weight = rtc_guidance_weight(t, self._beta)
        return -weight if self._convention == "openpi" else weight

    def guided_velocity(
        self, velocity_fn: Callable[[Tensor], Tensor], x: Tensor, t: Union[float, Tensor]
    ) -> Tensor:
        """One guided velocity for a loop of your own, in :attr:`convention`.

        ``velocity_fn(x) -> v`` [B, H, D] is the policy at time ``t`` (a float or [B]:
        openpi t, 1 = noise; paper τ, 0 = noise). Returns v' [B, H, D] (module docstring),
        detached; integrate it as your loop does (openpi: x + Δt·v' with Δt < 0).
        """
        if torch.is_inference_mode_enabled():
            raise InvalidArgumentError(
                "guided_velocity differentiates through velocity_fn, which "
                "torch.inference_mode() forbids (torch.no_grad() is fine)"
            )
        # a Python float stays float64 (torch.as_tensor would round it to float32 first)
        time = t.detach() if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)
        time = time.to("cpu", torch.float64).reshape(-1)
        weight = torch.from_numpy(rtc_guidance_weight(time.numpy(), self._beta))
        weight = weight.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1)
        time = time.to(device=x.device, dtype=x.dtype).reshape(-1, 1, 1)
        openpi = self._convention == "openpi"
        if self.mode != POLICY_VJP:  # the policy's Jacobian dropped: no backward pass
            v = velocity_fn(x.detach())
            x0_hat = x - time * v if openpi else x + (1.0 - time) * v
            g = self.gradient(x, x0_hat)
            return (v - weight * g if openpi else v + weight * g).detach()
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            v = velocity_fn(leaf)
            x0_hat = leaf - time * v if openpi else leaf + (1.0 - time) * v
            (g,) = torch.autograd.grad(x0_hat, leaf, self.gradient(x, x0_hat.detach()))
        return (v - weight * g if openpi else v + weight * g).detach()
