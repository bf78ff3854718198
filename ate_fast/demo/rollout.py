"""Closed-loop evaluation in the point-mass environment (receding-horizon chunks).

Every ``exec_steps`` steps the policy samples a chunk of ``horizon`` actions for the
current observation (``FlowSampler``, optionally with inference-time guidance) and the
robot executes its first ``exec_steps`` actions through its action map. All episodes run
as one batch; the sampling noise comes from a generator seeded with ``noise_seed``, so
every policy sees the same noise (common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ate_fast.demo.embodiment import ACTION_DIM, Embodiment
from ate_fast.demo.point_mass import PointMassEnv, Tasks, expert_episode
from ate_fast.sampling import FlowSampler, Guidance


@dataclass
class Rollout:
    """Per episode: ``success [N]`` bool, ``final_error [N]`` (distance to the goal),
    ``collided [N]`` bool."""

    success: np.ndarray
    final_error: np.ndarray
    collided: np.ndarray

    def summary(self) -> dict[str, float]:
        """Success rate with its binomial standard error, mean final error, collisions."""
        n = len(self.success)
        rate = float(self.success.mean())
        return {
            "episodes": n,
            "success_rate": rate,
            "success_se": float(np.sqrt(rate * (1 - rate) / n)),
            "final_error": float(self.final_error.mean()),
            "collision_rate": float(self.collided.mean()),
        }


def _finish(env: PointMassEnv, robot: Embodiment) -> Rollout:
    return Rollout(env.success(robot.has_gripper), env.final_error(), env.collided.copy())


@torch.no_grad()
def policy_rollout(
    policy: nn.Module,
    tasks: Tasks,
    robot: Embodiment,
    *,
    horizon: int,
    exec_steps: int,
    episode_steps: int,
    flow_steps: int,
    device: torch.device,
    noise_seed: int,
    guidance: Optional[Guidance] = None,
    desc: str = "rollout",
    progress: bool = True,
) -> Rollout:
    """Run ``policy`` (a flow head ``(x [B,H,D], t [B], obs [B,OBS_DIM]) -> v``) on every
    task for ``episode_steps`` steps."""
    policy.eval()
    sampler = FlowSampler(policy, num_steps=flow_steps)
    env = PointMassEnv(tasks)
    gen = torch.Generator().manual_seed(noise_seed)
    n = len(tasks)
    for start in tqdm(
        range(0, episode_steps, exec_steps), desc=desc, leave=False, disable=not progress
    ):
        obs = torch.from_numpy(env.observe()).float().to(device)
        noise = torch.randn(n, horizon, ACTION_DIM, generator=gen).to(device)
        chunk = sampler.sample(noise, obs, guidance=guidance).double().cpu().numpy()
        for j in range(min(exec_steps, episode_steps - start)):
            velocity, closed = robot.from_actions(chunk[:, j])
            env.step(velocity, closed)
    return _finish(env, robot)


def expert_rollout(tasks: Tasks, robot: Embodiment, episode_steps: int) -> Rollout:
    """Replay the expert's plans through ``robot``'s action map (to and back): the
    environment's check that every task is solvable within ``episode_steps``."""
    env = PointMassEnv(tasks)
    plans = [robot.to_actions(ep.velocity, ep.closed) for ep in _episodes(tasks)]
    for k in range(episode_steps):
        actions = np.stack([p[min(k, len(p) - 1)] for p in plans])
        velocity, closed = robot.from_actions(actions)
        env.step(velocity, closed)
    return _finish(env, robot)


def _episodes(tasks: Tasks) -> list:
    return [expert_episode(tasks, i, idle_steps=1) for i in range(len(tasks))]
