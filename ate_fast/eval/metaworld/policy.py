"""State-conditioned chunk policies for the Meta-World benchmark, trained with
ate_fast's flow matching or diffusion objective (plainly, or with the ATE Steer loss),
and sampled with ate_fast's samplers.

The policy is an :class:`~ate_fast.models.MLPHead` over the whole chunk
(``x [B, H, ACTION_DIM]``) conditioned on the normalised observation and a one-hot task
id (``cond [B, 39 + T]``):

* ``"flow"`` — openpi's convention (``x_t = t·ε + (1−t)·a0``, target ``ε − a0``, t drawn
  as ``0.001 + 0.999·Beta(1.5, 1)``), sampled by Euler integration (``FlowSampler``);
* ``"diffusion"`` — ε-prediction on a 100-step cosine schedule (Diffusion Policy's
  ``squaredcos_cap_v2``), sampled by DDIM (``DiffusionSampler``).

Losses are averaged over the robot's action slots only (the chunk's mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ate_fast.eval.metaworld.config import POLICY_KINDS
from ate_fast.eval.metaworld.embodiment import ACTION_DIM
from ate_fast.eval.metaworld.envs import OBS_DIM
from ate_fast.eval.metaworld.experts import ChunkSet
from ate_fast.models import MLPHead, make_head
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.steer import Steer

DIFFUSION_TRAIN_STEPS = 100
TIME_BETA_A = 1.5
MIN_OBS_STD = 1e-2  # observation entries that never move (padding objects) stay unscaled


@dataclass(frozen=True)
class PolicySpec:
    """``kind`` in :data:`POLICY_KINDS`; the chunk ``horizon``; the MLP's ``hidden`` width
    and ``depth``; ``num_tasks`` one-hot task slots."""

    kind: str
    horizon: int
    hidden: int
    depth: int
    num_tasks: int

    def __post_init__(self) -> None:
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"policy: expected one of {list(POLICY_KINDS)}, got {self.kind!r}")

    @property
    def cond_dim(self) -> int:
        return OBS_DIM + self.num_tasks


class Conditioner(nn.Module):
    """``(obs [B, 39], task [B]) -> cond [B, 39 + T]``: the observation standardised with
    the pre-training data's statistics, then the task's one-hot vector."""

    def __init__(self, num_tasks: int, obs: Optional[Tensor] = None) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        mean = torch.zeros(OBS_DIM) if obs is None else obs.mean(0)
        std = torch.ones(OBS_DIM) if obs is None else obs.std(0).clamp_min(MIN_OBS_STD)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, obs: Tensor, task: Tensor) -> Tensor:
        one_hot = nn.functional.one_hot(task, self.num_tasks).to(obs.dtype)
        return torch.cat([(obs - self.mean) / self.std, one_hot], dim=1)


def make_policy(spec: PolicySpec) -> MLPHead:
    """A fresh flat ``MLPHead``: ``forward(x [B, H, 8], t [B], cond [B, 39 + T])``."""
    return make_head(
        "mlp",
        "flat",
        horizon=spec.horizon,
        action_dim=ACTION_DIM,
        hidden=spec.hidden,
        depth=spec.depth,
        cond_dim=spec.cond_dim,
        # diffusion timesteps are integers 0..99: embed t/100 on the flow's scale
        time_scale=1.0 / DIFFUSION_TRAIN_STEPS if spec.kind == "diffusion" else 1.0,
    )


def noise_schedule() -> NoiseSchedule:
    return NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=DIFFUSION_TRAIN_STEPS)


def make_sampler(policy: nn.Module, kind: str, steps: int) -> Union[FlowSampler, DiffusionSampler]:
    """Euler flow integration or DDIM with ``steps`` steps."""
    if kind == "flow":
        return FlowSampler(policy, num_steps=steps)
    return DiffusionSampler(policy, noise_schedule(), method="ddim", num_steps=steps)


@dataclass
class Fit:
    """``loss``: mean of the last 10 % of steps (for Steer the corrected loss); ``steer``:
    Steer's diagnostics averaged over all steps; ``seconds``."""

    steps: int
    loss: float
    seconds: float
    steer: dict


def train_policy(
    policy: nn.Module,
    conditioner: Conditioner,
    data: ChunkSet,
    *,
    kind: str,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    steer: Optional[Steer] = None,
    progress: bool = False,
    desc: str = "train",
) -> Fit:
    """Train ``policy`` in place for ``steps`` AdamW steps (cosine decay to ``lr/10``,
    gradient norm clipped at 1). Batches, noise and times come from a generator seeded
    with ``seed``: two runs with one seed see the same batches (a paired comparison)."""
    import time

    gen = torch.Generator().manual_seed(seed)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.1 + 0.45 * (1 + math.cos(math.pi * min(k / steps, 1.0)))
    )
    schedule = noise_schedule() if kind == "diffusion" else None
    alphas = schedule.alphas_cumprod.float() if schedule is not None else None
    mask = data.mask[None, None, :]
    denom = float(batch * data.chunks.shape[1] * data.mask.sum())
    with torch.no_grad():
        cond_all = conditioner(data.obs, data.task)
    losses, diag_sums = [], {}
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=not progress):
        idx = torch.randint(len(data), (batch,), generator=gen)
        a0, cond = data.chunks[idx], cond_all[idx]
        noise = torch.randn(a0.shape, generator=gen)
        if kind == "flow":
            t = torch.rand(batch, generator=gen).pow(1.0 / TIME_BETA_A) * 0.999 + 0.001
            x = t[:, None, None] * noise + (1 - t[:, None, None]) * a0
            pred = policy(x, t, cond)
            if steer is None:
                err = (pred - (noise - a0)).square()
            else:
                err, diag = steer.flow_loss(pred, x, a0, noise, t, loss_reduction="none")
        else:
            k = torch.randint(DIFFUSION_TRAIN_STEPS, (batch,), generator=gen)
            ab = alphas[k][:, None, None]
            x = ab.sqrt() * a0 + (1 - ab).sqrt() * noise
            pred = policy(x, k, cond)
            if steer is None:
                err = (pred - noise).square()
            else:
                err, diag = steer.diffusion_loss(
                    pred, x, a0, noise, k, schedule, "epsilon", loss_reduction="none"
                )
        if steer is not None:
            for name, value in diag.items():
                diag_sums[name] = diag_sums.get(name, 0.0) + float(value)
        loss = (err * mask).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach())
    policy.eval()
    tail = torch.stack(losses[-max(1, steps // 10) :]).mean().item()
    return Fit(
        steps, tail, time.perf_counter() - start, {k: v / steps for k, v in diag_sums.items()}
    )
