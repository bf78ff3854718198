"""State-conditioned chunk policies for the Meta-World benchmark, trained with
ate_fast's flow matching or diffusion objective (plainly, or with the ATE Steer loss),
and sampled with ate_fast's samplers.

The policy is an :class:`~ate_fast.models.MLPHead` over the whole chunk
(``x [B, H, ACTION_DIM]``) conditioned on the normalised observation and a one-hot task
id (``cond [B, 39 + T]``):

* ``"flow"`` — openpi's convention (``x_t = t·ε + (1−t)·a0``, target ``ε − a0``, t drawn
  as ``0.001 + 0.999·Beta(1.5, 1)``; :class:`~ate_fast.adaptation.FlowMatching`), sampled
  by Euler integration (``FlowSampler``);
* ``"diffusion"`` — ε-prediction on a 100-step cosine schedule (Diffusion Policy's
  ``squaredcos_cap_v2``; :class:`~ate_fast.adaptation.EpsilonDiffusion`), sampled by
  DDIM (``DiffusionSampler``).

Training runs the shared loop (:func:`~ate_fast.adaptation.train_chunk_policy`); losses
are averaged over the robot's action slots only (the chunk's mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ate_fast.adaptation.objectives import EpsilonDiffusion, FlowMatching, Objective
from ate_fast.adaptation.policy_training import PolicyFit, train_chunk_policy
from ate_fast.eval.metaworld.config import POLICY_KINDS
from ate_fast.eval.metaworld.embodiment import ACTION_DIM
from ate_fast.eval.metaworld.envs import OBS_DIM
from ate_fast.eval.metaworld.experts import ChunkSet
from ate_fast.models import MLPHead, make_head
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.steer import Steer

DIFFUSION_TRAIN_STEPS = 100
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
    objective: Optional[Objective] = None,
) -> PolicyFit:
    """Train ``policy`` in place on ``data`` (conditioned on each chunk's observation and
    task) with the ``kind``'s objective for ``steps`` AdamW steps (see
    ``train_chunk_policy``). Batches, noise and times come from a generator seeded with
    ``seed``: two runs with one seed see the same batches (a paired comparison).
    ``objective`` replaces the kind's (e.g. :class:`~ate_fast.adaptation.RTCFlowMatching`)."""
    with torch.no_grad():
        cond = conditioner(data.obs, data.task)
    if objective is None:
        objective = FlowMatching() if kind == "flow" else EpsilonDiffusion(noise_schedule())
    return train_chunk_policy(
        policy,
        data.chunks,
        cond,
        data.mask,
        objective,
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        steer=steer,
        diagnostics_on_host=True,  # float64 sums, as in the benchmark's recorded runs
        desc=desc,
        progress=progress,
    )
