"""Training-time real-time chunking (Black, Ren, Equi, Levine, arXiv 2512.05964).

Simulate the inference delay in training: per example draw a delay d (0 ≤ d ≤
``max_delay``), keep the first d actions of the noisy chunk clean and train only on the
rest. At inference the committed prefix is written into the sample at every step
(:class:`~ate_fast.realtime.PrefixInpainting`, the sampler's ``inpainting=`` option), so
the policy continues the chunk that is already being executed, with no inference-time
guidance.

openpi convention (t = 1 noise, t = 0 data; ``"paper"``: τ = 1 − t), per example b::

    x_t = t·ε + (1 − t)·a0,   then x_t[b, :d_b] = a0[b, :d_b]
    loss = Σ_{i ≥ d_b} ‖v(x_t, t) − (ε − a0)‖²_i / (number of trained elements)

**One time per sample.** The paper (and LeRobot's implementation) gives the prefix
tokens their own flow time, the clean one (τ = 1, openpi t = 0), through a per-token time
embedding. ate_fast's reference heads (:func:`ate_fast.models.make_head`) and the
samplers take one time per sample ``t [B]``; this module keeps that: the prefix is
overwritten with the clean actions and the whole chunk gets the example's t. The model
tells the clean prefix from the noisy rest by its content only (as at inference, where
``PrefixInpainting`` does the same), which is what a policy without per-token times can
learn. The loss never asks the prefix's velocity to be anything.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.guidance import FLOW_CONVENTIONS

DELAY_DISTRIBUTIONS = ("uniform", "exp")
LOSS_REDUCTIONS = ("mean", "none")


class PrefixBatch(NamedTuple):
    """A training batch with its simulated delays.

    ``x_t`` [B, H, D]: the interpolant with the first ``delays[b]`` actions clean;
    ``delays`` [B] int64 (on x_t's device); ``postfix`` [B, H, 1] (x_t's dtype): 1 where
    the loss is taken (i ≥ d_b), 0 on the prefix.
    """

    x_t: Tensor
    delays: Tensor
    postfix: Tensor


def _check_chunks(**chunks: Tensor) -> tuple[int, ...]:
    shape: Optional[tuple[int, ...]] = None
    for name, t in chunks.items():
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor [B, H, D], got {type(t)}")
        if t.ndim != 3 or not t.is_floating_point():
            raise InvalidArgumentError(
                f"{name} must be a floating [B, H, D] tensor, got {t.dtype} {tuple(t.shape)}"
            )
        if shape is None:
            shape = tuple(t.shape)
        elif tuple(t.shape) != shape:
            raise InvalidArgumentError(
                f"{name} must have the shape of the other chunks {shape}, got {tuple(t.shape)}"
            )
    assert shape is not None
    return shape


class TrainingTimeRTC:
    """Simulated inference delays for a flow policy's training loss.

    Args:
        max_delay: the largest delay d drawn (the worst expected inference delay, in
            control steps; < H). ``max_delay=0`` gives the plain flow loss, bit for bit.
        min_delay: the smallest delay drawn (default 0).
        distribution: ``"uniform"`` over ``min_delay..max_delay``, or ``"exp"``:
            P(d) ∝ exp(−``exp_decay``·(d − min_delay)) (more weight on small delays).
        exp_decay: the decay of ``"exp"`` (≥ 0; 0 is uniform).

    Use: ``batch = rtc.prefix_batch(a0, noise, t, rtc.draw_delays(B, gen))``, evaluate the
    policy at ``batch.x_t``, then :meth:`flow_loss` — or, with ATE Steer,
    ``rtc.masked_mean(steer.flow_loss(v, batch.x_t, a0, noise, t,
    loss_reduction="none").loss, batch)``.
    """

    def __init__(
        self,
        max_delay: int,
        *,
        min_delay: int = 0,
        distribution: str = "uniform",
        exp_decay: float = 1.0,
    ) -> None:
        self.max_delay = check_int("max_delay", max_delay, 0, 1 << 20)
        self.min_delay = check_int(
            "min_delay", min_delay, 0, self.max_delay, f" (max_delay = {self.max_delay})"
        )
        self.distribution = check_choice("distribution", distribution, DELAY_DISTRIBUTIONS)
        self.exp_decay = check_float("exp_decay", exp_decay, 0.0)

    def __repr__(self) -> str:
        return (
            f"TrainingTimeRTC(max_delay={self.max_delay}, min_delay={self.min_delay}, "
            f"distribution={self.distribution!r}, exp_decay={self.exp_decay})"
        )

    def probabilities(self) -> np.ndarray:
        """P(d) for d = 0..max_delay, ``[max_delay + 1]`` float64 (0 below min_delay)."""
        d = np.arange(self.max_delay + 1, dtype=np.float64)
        decay = self.exp_decay if self.distribution == "exp" else 0.0
        w = np.where(d >= self.min_delay, np.exp(-decay * (d - self.min_delay)), 0.0)
        return w / w.sum()

    def draw_delays(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[B]`` int64 delays on the CPU drawn from ``generator`` (none drawn, and
        nothing consumed, when ``max_delay == min_delay``)."""
        batch = check_int("batch", batch, 1, 1 << 40)
        if self.max_delay == self.min_delay:
            return torch.full((batch,), self.min_delay, dtype=torch.int64)
        p = torch.from_numpy(self.probabilities())
        return torch.multinomial(p, batch, replacement=True, generator=generator)

    def prefix_batch(
        self, a0: Tensor, noise: Tensor, t: Tensor, delays: Tensor, convention: str = "openpi"
    ) -> PrefixBatch:
        """The interpolant of ``a0``, ``noise`` [B, H, D] at times ``t`` [B] with the first
        ``delays`` [B] (ints in min_delay..max_delay, < H) actions clean."""
        batch, horizon, _ = _check_chunks(a0=a0, noise=noise)
        check_choice("convention", convention, FLOW_CONVENTIONS)
        if not isinstance(t, Tensor) or tuple(t.shape) != (batch,) or not t.is_floating_point():
            raise InvalidArgumentError(f"t must be a floating tensor [B] = [{batch}], got {t!r}")
        if self.max_delay >= horizon:
            raise InvalidArgumentError(
                f"max_delay must be < H = {horizon} (a0's horizon: at least one action is "
                f"trained), got {self.max_delay}"
            )
        delays = self._check_delays(delays, batch).to(a0.device)
        tt = t.to(device=a0.device, dtype=a0.dtype)[:, None, None]
        # openpi: x_t = t·ε + (1 − t)·a0; paper: x_τ = τ·a0 + (1 − τ)·ε
        x_t = tt * noise + (1 - tt) * a0 if convention == "openpi" else tt * a0 + (1 - tt) * noise
        prefix = (torch.arange(horizon, device=a0.device)[None, :] < delays[:, None])[..., None]
        x_t = torch.where(prefix, a0, x_t)
        return PrefixBatch(x_t, delays, (~prefix).to(a0.dtype))

    def _check_delays(self, delays: object, batch: int) -> Tensor:
        if not isinstance(delays, Tensor) or delays.is_floating_point() or delays.ndim != 1:
            raise InvalidArgumentError(
                f"delays must be an integer tensor [B] = [{batch}] (draw_delays), got {delays!r}"
            )
        if delays.shape[0] != batch:
            raise InvalidArgumentError(f"delays must have B = {batch} entries, got {delays.shape}")
        if delays.device.type == "cpu":  # checked where it costs no device sync
            low, high = int(delays.min()), int(delays.max())
            if low < self.min_delay or high > self.max_delay:
                raise InvalidArgumentError(
                    f"delays must lie in [{self.min_delay}, {self.max_delay}] (min_delay, "
                    f"max_delay), got values in [{low}, {high}]"
                )
        return delays

    @staticmethod
    def masked_mean(per_element: Tensor, batch: PrefixBatch) -> Tensor:
        """The mean of ``per_element`` [B, H, D] over the trained (postfix) elements: the
        composition with ``Steer.flow_loss(..., loss_reduction="none").loss``."""
        if per_element.shape != batch.x_t.shape:
            raise InvalidArgumentError(
                f"per_element must have x_t's shape {tuple(batch.x_t.shape)}, got "
                f"{tuple(per_element.shape)}"
            )
        # sum and count in float32 at least (as F.mse_loss accumulates): in float16 both
        # overflow 65504 at ordinary sizes (B, H, D = 64, 50, 32), and bf16 sums lose digits
        acc = torch.promote_types(per_element.dtype, torch.float32)
        count = batch.postfix.to(acc).sum() * per_element.shape[-1]
        total = (per_element.to(acc) * batch.postfix.to(acc)).sum()
        return (total / count).to(per_element.dtype)

    def flow_loss(
        self,
        v_pred: Tensor,
        batch: PrefixBatch,
        a0: Tensor,
        noise: Tensor,
        convention: str = "openpi",
        *,
        loss_reduction: str = "mean",
    ) -> Tensor:
        """The flow-matching loss of ``v_pred`` [B, H, D] (the policy at ``batch.x_t``)
        without the prefix: ``"mean"`` over the trained elements (a scalar) or ``"none"``
        (the per-element squared error [B, H, D], 0 on the prefix)."""
        _check_chunks(v_pred=v_pred, a0=a0, noise=noise, x_t=batch.x_t)
        check_choice("convention", convention, FLOW_CONVENTIONS)
        check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        target = noise - a0 if convention == "openpi" else a0 - noise
        err = (v_pred - target).square()
        if loss_reduction == "mean":
            return self.masked_mean(err, batch)
        return err * batch.postfix.to(err.dtype)
