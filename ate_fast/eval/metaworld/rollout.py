"""Closed-loop evaluation: every episode of every task in one lockstep batch, receding
horizon (sample a chunk of H actions, execute the first ``exec_steps`` through the
robot's action map, resample).

The sampling noise comes from a generator seeded with ``noise_seed`` and drawn for all
episodes at every replanning step (finished ones included), so two policies evaluated
with one seed see the same noise (common random numbers).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ate_fast.eval.metaworld.embodiment import ACTION_DIM, Shift
from ate_fast.eval.metaworld.envs import HAND, LockstepEnvs
from ate_fast.eval.metaworld.policy import Conditioner, make_sampler
from ate_fast.sampling import Guidance


@torch.no_grad()
def evaluate(
    policy: nn.Module,
    conditioner: Conditioner,
    *,
    kind: str,
    shift: Shift,
    layouts: dict[str, np.ndarray],
    task_index: dict[str, int],
    horizon: int,
    exec_steps: int,
    max_steps: int,
    sampler_steps: int,
    noise_seed: int,
    guidance: Optional[Guidance] = None,
) -> dict[str, dict[str, list]]:
    """Run ``policy`` on ``layouts[task]`` (layout seeds) of each task.

    Returns ``{task: {"success": [0/1 per episode], "steps": [steps per episode]}}`` in
    the order of ``layouts[task]``.
    """
    tasks = [t for t, seeds in layouts.items() for _ in seeds]
    envs = LockstepEnvs(tasks, np.concatenate(list(layouts.values())), max_steps)
    task_ids = torch.tensor([task_index[t] for t in tasks])
    sampler = make_sampler(policy.eval(), kind, sampler_steps)
    gen = torch.Generator().manual_seed(noise_seed)
    n = len(tasks)
    while not envs.done.all():
        noise = torch.randn(n, horizon, ACTION_DIM, generator=gen)
        live = np.flatnonzero(~envs.done)
        obs = torch.from_numpy(envs.obs[live]).float()
        cond = conditioner(obs, task_ids[live])
        chunk = sampler.sample(noise[live], cond, guidance=guidance).double().numpy()
        for j in range(exec_steps):
            running = ~envs.done[live]
            if not running.any():
                break
            actions = np.zeros((n, 4))
            actions[live] = shift.to_env(chunk[:, j], envs.obs[live][:, HAND])
            envs.step(actions)
    out: dict[str, dict[str, list]] = {}
    for t in layouts:
        rows = [i for i, name in enumerate(tasks) if name == t]
        out[t] = {
            "success": envs.success[rows].astype(int).tolist(),
            "steps": envs.steps[rows].tolist(),
        }
    return out
