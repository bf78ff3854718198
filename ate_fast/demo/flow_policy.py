"""The demo's flow policy: a flattened ``MLPHead`` trained by flow matching (openpi
convention: ``x_t = t·ε + (1−t)·a0``, t = 1 is noise, target ``ε − a0``), plainly or with
the ATE Steer loss (``Steer.flow_loss``) in place of the MSE."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ate_fast.demo.demonstrations import ChunkData
from ate_fast.demo.embodiment import ACTION_DIM
from ate_fast.demo.point_mass import OBS_DIM
from ate_fast.models import MLPHead, make_head
from ate_fast.steer import Steer

TIME_BETA_A = 1.5  # openpi's flow time distribution: t = 0.001 + 0.999·Beta(1.5, 1)


def make_policy(horizon: int, hidden: int, depth: int) -> MLPHead:
    """``MLPHead`` over the whole chunk: ``forward(x [B, H, D], t [B], obs [B, OBS_DIM])``."""
    return make_head(
        "mlp",
        "flat",
        horizon=horizon,
        action_dim=ACTION_DIM,
        hidden=hidden,
        depth=depth,
        cond_dim=OBS_DIM,
    )


@dataclass
class FlowFit:
    """What a training run reports: ``loss`` (mean of the last 10% of steps; for Steer
    the corrected loss), ``seconds``, and for Steer the means over all steps of its
    diagnostics (``clamp_fraction``, ``correction_ratio``, ``grad_norm``)."""

    steps: int
    loss: float
    seconds: float
    steer: dict[str, float] = field(default_factory=dict)


def _flow_batch(
    data: ChunkData, batch: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(a0 [B, H, D], obs [B, OBS_DIM], noise [B, H, D], t [B])`` drawn from ``gen``."""
    idx = torch.randint(len(data), (batch,), generator=gen)
    noise = torch.randn(data.chunks[idx].shape, generator=gen)
    # Beta(a, 1) by inversion: its CDF is t^a
    t = torch.rand(batch, generator=gen).pow(1.0 / TIME_BETA_A) * 0.999 + 0.001
    return data.chunks[idx], data.obs[idx], noise, t


def train_flow(
    policy: nn.Module,
    data: ChunkData,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device: torch.device,
    steer: Optional[Steer] = None,
    desc: str = "flow",
    progress: bool = True,
) -> FlowFit:
    """Train ``policy`` in place on ``data`` for ``steps`` AdamW steps (cosine decay to
    ``lr/10``, gradient norm clipped at 1). The loss is averaged over the robot's action
    slots only (``data.mask``). All batches, noise and times come from a generator
    seeded with ``seed``, so two runs with the same seed see the same batches.
    """
    gen = torch.Generator().manual_seed(seed)
    policy.to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k / steps, 1.0)))
    )
    mask = data.mask.to(device)[None, None, :]
    denom = float(batch * data.chunks.shape[1] * data.mask.sum())
    losses: list[Tensor] = []
    diag_sums: dict[str, Tensor] = {}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, disable=not progress)
    for k in bar:
        a0, obs, noise, t = (v.to(device) for v in _flow_batch(data, batch, gen))
        tt = t[:, None, None]
        x_t = tt * noise + (1 - tt) * a0
        v_pred = policy(x_t, t, obs)
        if steer is None:
            err = (v_pred - (noise - a0)).square()
        else:
            err, diag = steer.flow_loss(v_pred, x_t, a0, noise, t, loss_reduction="none")
            for name, value in diag.items():
                diag_sums[name] = diag_sums.get(name, 0.0) + value
        loss = (err * mask).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
        if progress and (k + 1) % 100 == 0:
            bar.set_postfix(loss=f"{torch.stack(losses[-100:]).mean().item():.4f}")
    tail = torch.stack(losses[-max(1, steps // 10) :]).mean().item()
    policy.eval()
    return FlowFit(
        steps=steps,
        loss=tail,
        seconds=time.perf_counter() - start,
        steer={k: float(v) / steps for k, v in diag_sums.items()},
    )
