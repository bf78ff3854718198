"""The chunk policies' training objectives, each plain or with the ATE Steer loss.

An objective draws the per-sample times and turns a batch ``(a0, cond, noise, times)``
into the per-element squared error ``[B, H, D]`` (the caller masks and averages it), with
Steer's diagnostics when a :class:`~ate_fast.steer.Steer` corrects the loss.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor, nn

from ate_fast.realtime import TrainingTimeRTC
from ate_fast.sampling import NoiseSchedule
from ate_fast.steer import Steer

TIME_BETA_A = 1.5  # openpi's flow time distribution: t = 0.001 + 0.999·Beta(1.5, 1)


class Objective(Protocol):
    def draw_times(self, batch: int, generator: torch.Generator) -> Tensor:
        """``[B]`` times (or timesteps) on the CPU, drawn from ``generator``."""
        ...

    def error(
        self,
        policy: nn.Module,
        a0: Tensor,
        cond: Tensor,
        noise: Tensor,
        times: Tensor,
        steer: Optional[Steer],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(squared error [B, H, D], Steer's diagnostics or {})`` of ``policy`` on clean
        chunks ``a0 [B, H, D]`` with ``cond [B, C]``, ``noise [B, H, D]`` and ``times [B]``."""
        ...


class FlowMatching:
    """openpi's flow matching: ``x_t = t·ε + (1−t)·a0`` (t = 1 is noise), target ``ε − a0``,
    ``t = 0.001 + 0.999·Beta(1.5, 1)``; the policy is ``(x_t, t, cond) -> velocity``."""

    def draw_times(self, batch: int, generator: torch.Generator) -> Tensor:
        # Beta(a, 1) by inversion: its CDF is t^a
        return torch.rand(batch, generator=generator).pow(1.0 / TIME_BETA_A) * 0.999 + 0.001

    def error(
        self,
        policy: nn.Module,
        a0: Tensor,
        cond: Tensor,
        noise: Tensor,
        times: Tensor,
        steer: Optional[Steer],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        tt = times[:, None, None]
        x_t = tt * noise + (1 - tt) * a0
        v_pred = policy(x_t, times, cond)
        if steer is None:
            return (v_pred - (noise - a0)).square(), {}
        return steer.flow_loss(v_pred, x_t, a0, noise, times, loss_reduction="none")


class RTCFlowMatching(FlowMatching):
    """:class:`FlowMatching` with training-time real-time chunking
    (:class:`~ate_fast.realtime.TrainingTimeRTC`): per example a delay d, the first d
    actions of ``x_t`` clean, the loss on the rest only. Delays come from their own
    generator (seeded with ``seed``), so batches, noise and times stay those of plain
    flow matching for the same training seed (a paired comparison). The error is scaled so
    that the training loop's fixed denominator (B·H·slots) gives the mean over the trained
    elements."""

    def __init__(self, rtc: TrainingTimeRTC, seed: int) -> None:
        self.rtc = rtc
        self.generator = torch.Generator().manual_seed(seed)

    def error(
        self,
        policy: nn.Module,
        a0: Tensor,
        cond: Tensor,
        noise: Tensor,
        times: Tensor,
        steer: Optional[Steer],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        delays = self.rtc.draw_delays(a0.shape[0], self.generator)
        batch = self.rtc.prefix_batch(a0, noise, times, delays)
        v_pred = policy(batch.x_t, times, cond)
        if steer is None:
            err, diagnostics = (v_pred - (noise - a0)).square(), {}
        else:
            err, diagnostics = steer.flow_loss(
                v_pred, batch.x_t, a0, noise, times, loss_reduction="none"
            )
        scale = batch.postfix.numel() / batch.postfix.sum()
        return err * batch.postfix * scale, diagnostics


class EpsilonDiffusion:
    """ε-prediction on ``schedule``: ``x_k = √ᾱ_k·a0 + √(1−ᾱ_k)·ε`` at a uniform integer
    timestep k; the policy is ``(x_k, k, cond) -> ε``."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.schedule = schedule
        self.alphas = schedule.alphas_cumprod.float()  # [N]

    def draw_times(self, batch: int, generator: torch.Generator) -> Tensor:
        return torch.randint(self.alphas.shape[0], (batch,), generator=generator)

    def error(
        self,
        policy: nn.Module,
        a0: Tensor,
        cond: Tensor,
        noise: Tensor,
        times: Tensor,
        steer: Optional[Steer],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ab = self.alphas.to(times.device)[times][:, None, None]
        x_k = ab.sqrt() * a0 + (1 - ab).sqrt() * noise
        pred = policy(x_k, times, cond)
        if steer is None:
            return (pred - noise).square(), {}
        return steer.diffusion_loss(
            pred, x_k, a0, noise, times, self.schedule, "epsilon", loss_reduction="none"
        )
