"""Expert demonstrations of a robot, cut into (observation, action chunk) training pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ate_fast.demo.embodiment import Embodiment
from ate_fast.demo.point_mass import Tasks, expert_episode, observe


@dataclass
class ChunkData:
    """``obs [M, OBS_DIM]``, ``chunks [M, H, ACTION_DIM]`` (the robot's unified actions from
    each step on, the last action repeated past the episode's end: the robot at rest with
    its gripper as it was), ``mask [ACTION_DIM]`` (the robot's slots), ``episode [M]`` (the
    episode each chunk was cut from), ``episodes`` (their number).
    """

    obs: Tensor
    chunks: Tensor
    mask: Tensor
    episode: np.ndarray
    episodes: int

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def vae_dataset(self) -> MaskedChunks:
        """The chunks as ``ate_fast.align`` takes them: items ``(chunk [H, D], mask [D])``,
        with ``episode_of_chunk`` so that a validation split keeps episodes whole."""
        return MaskedChunks(self.chunks, self.mask, self.episode)


class MaskedChunks(Dataset):
    """Items ``(chunks[i] [H, D], mask [D])``; ``episode_of_chunk [M]``."""

    def __init__(self, chunks: Tensor, mask: Tensor, episode_of_chunk: np.ndarray) -> None:
        self.chunks, self.mask, self.episode_of_chunk = chunks, mask, episode_of_chunk

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.chunks[i], self.mask


def demonstration_chunks(tasks: Tasks, robot: Embodiment, horizon: int) -> ChunkData:
    """The expert's episodes on ``tasks`` in ``robot``'s action space, one chunk per step.

    Each episode runs until the goal is reached plus ``horizon`` steps at rest, so chunks
    near the end show the robot stopping (and, for robot B, closing its gripper).
    """
    obs, chunks, episode = [], [], []
    for i in range(len(tasks)):
        ep = expert_episode(tasks, i, idle_steps=horizon)
        actions = robot.to_actions(ep.velocity, ep.closed)  # [L, D]
        length = len(actions)
        padded = np.concatenate([actions, np.repeat(actions[-1:], horizon - 1, axis=0)])
        starts = np.arange(length)
        chunks.append(padded[starts[:, None] + np.arange(horizon)[None, :]])
        episode.append(np.full(length, i))
        obs.append(observe(ep.positions[:length], tasks.goal[i], tasks.center[i], tasks.radius[i]))
    return ChunkData(
        obs=torch.from_numpy(np.concatenate(obs)).float(),
        chunks=torch.from_numpy(np.concatenate(chunks)).float(),
        mask=torch.from_numpy(robot.mask),
        episode=np.concatenate(episode),
        episodes=len(tasks),
    )
