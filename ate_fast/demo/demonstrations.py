"""Expert demonstrations of a robot, cut into (observation, action chunk) training pairs."""

from __future__ import annotations

import numpy as np
import torch

from ate_fast.adaptation.chunks import ChunkData, chunk_windows
from ate_fast.demo.embodiment import Embodiment
from ate_fast.demo.point_mass import Tasks, expert_episode, observe


def demonstration_chunks(tasks: Tasks, robot: Embodiment, horizon: int) -> ChunkData:
    """The expert's episodes on ``tasks`` in ``robot``'s action space, one chunk per step:
    ``obs [M, OBS_DIM]``, ``chunks [M, H, ACTION_DIM]`` (past the episode's end the robot
    rests with its gripper as it was), ``mask`` the robot's action slots.

    Each episode runs until the goal is reached plus ``horizon`` steps at rest, so chunks
    near the end show the robot stopping (and, for robot B, closing its gripper).
    """
    obs, chunks, episode = [], [], []
    for i in range(len(tasks)):
        ep = expert_episode(tasks, i, idle_steps=horizon)
        actions = robot.to_actions(ep.velocity, ep.closed)  # [L, D]
        length = len(actions)
        chunks.append(chunk_windows(actions, horizon))
        episode.append(np.full(length, i))
        obs.append(observe(ep.positions[:length], tasks.goal[i], tasks.center[i], tasks.radius[i]))
    return ChunkData(
        obs=torch.from_numpy(np.concatenate(obs)).float(),
        chunks=torch.from_numpy(np.concatenate(chunks)).float(),
        mask=torch.from_numpy(robot.mask),
        episode=np.concatenate(episode),
        episodes=len(tasks),
    )
