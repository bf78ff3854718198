"""Demonstrations as training pairs: ``(observation, action chunk)`` per step, in one
robot's padded action space, and the ``(chunk, mask)`` dataset of the align trainers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from ate_fast.argument_checks import check_int
from ate_fast.errors import InvalidArgumentError


class MaskedChunks(Dataset):
    """Items ``(chunks[i] [H, D], mask [D])``; ``episode_of_chunk [M]`` (so that a
    validation split keeps episodes whole)."""

    def __init__(self, chunks: Tensor, mask: Tensor, episode_of_chunk: np.ndarray) -> None:
        self.chunks, self.mask, self.episode_of_chunk = chunks, mask, episode_of_chunk

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.chunks[i], self.mask


@dataclass
class ChunkData:
    """``obs [M, O]``, ``chunks [M, H, D]`` (the robot's actions from each step on; past the
    episode's end the last action is repeated), ``mask [D]`` (the robot's action slots),
    ``episode [M]`` (the episode each chunk was cut from), ``episodes`` (their number)."""

    obs: Tensor
    chunks: Tensor
    mask: Tensor
    episode: np.ndarray
    episodes: int

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def vae_dataset(self) -> MaskedChunks:
        """The chunks as ``ate_fast.align`` takes them: items ``(chunk [H, D], mask [D])``."""
        return MaskedChunks(self.chunks, self.mask, self.episode)


def chunk_windows(actions: np.ndarray, horizon: int) -> np.ndarray:
    """``[L, H, D]``: for each step of ``actions [L, D]``, the ``horizon`` actions from it
    on, the last action repeated past the end."""
    horizon = check_int("horizon", horizon, 1)
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise InvalidArgumentError(
            f"actions must be an array [L, D] with L >= 1, got shape {actions.shape}"
        )
    length = len(actions)
    padded = np.concatenate([actions, np.repeat(actions[-1:], horizon - 1, axis=0)])
    return padded[np.arange(length)[:, None] + np.arange(horizon)[None, :]]
