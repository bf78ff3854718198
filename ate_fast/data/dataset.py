"""``ActionChunkDataset``: normalised, unified-dim action chunks ``[H, D]`` from any reader."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ate_fast.data.action_space import ActionSpaceMap
from ate_fast.data.chunking import PAD_MODES, chunk_starts
from ate_fast.data.episodes import Episode, check_consistent_dim, make_episode
from ate_fast.data.normalization import Normalizer
from ate_fast.data.readers import read_episodes

Source = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


def _as_episodes(source: Any, format: str, key: Optional[str], filter_key: Optional[str]):
    if isinstance(source, (str, os.PathLike)):
        return read_episodes(source, format, key, filter_key)
    items = list(source)
    if items and all(isinstance(s, (np.ndarray, Tensor, Episode)) for s in items):
        episodes = []
        for i, s in enumerate(items):
            if isinstance(s, Episode):
                episodes.append(s)
            else:
                arr = s.detach().cpu().numpy() if isinstance(s, Tensor) else s
                episodes.append(make_episode(f"episode {i}", arr))
        check_consistent_dim(episodes, "episodes")
        return episodes
    return read_episodes(items, format, key, filter_key)


class ActionChunkDataset(Dataset):
    """Action chunks of horizon ``H`` cut from episodes, normalised, in a unified dim ``D``.

    Item ``i`` is ``(chunk [H, D] float32, mask [D] float32)``; the mask is 1 on the dims
    the data has (see :class:`~ate_fast.data.action_space.ActionSpaceMap`). With
    ``step_mask=True`` it is ``(chunk, mask, steps [H] float32)``, ``steps`` 1 on the
    episode's own steps and 0 on the padding past its end (LeRobot's ``action_is_pad``,
    negated): the align trainers then leave padded steps out of the reconstruction loss. A
    batch of indices is gathered in one vectorised lookup (``__getitems__``).

    Args:
        source: a path or list of paths (any format :func:`~ate_fast.data.read_episodes`
            reads), or a list of in-memory episodes (arrays ``[T, D_r]``).
        horizon: ``H``.
        stride: steps between chunk starts within an episode (1: every step).
        pad: how a chunk that runs past its episode's end is filled: ``"edge"`` repeats
            the last action (LeRobot, Diffusion Policy), ``"zero"`` puts 0 in normalised
            space (the dataset mean for ``meanstd``).
        max_pad: the most padded steps per chunk (default ``H − 1``; 0 = full chunks only).
        step_mask: also return which steps are real (see above).
        normalization: ``"meanstd"``, ``"minmax"`` (to [−1, 1]) or ``"none"``; fitted on
            every frame of every episode, ignored when ``stats`` is given.
        stats: a fitted :class:`Normalizer` (or its ``to_dict()``) to reuse, e.g. the
            statistics saved in a stage-1 checkpoint.
        action_dim: unified ``D`` (default: the data's ``D_r``).
        dim_index: where each of the data's dims goes in ``D`` (default ``0..D_r−1``).
        format, key, filter_key: passed to :func:`~ate_fast.data.read_episodes`.
    """

    def __init__(
        self,
        source: Union[Source, Sequence[np.ndarray]],
        horizon: int,
        *,
        stride: int = 1,
        pad: str = "edge",
        max_pad: Optional[int] = None,
        step_mask: bool = False,
        normalization: str = "meanstd",
        stats: Union[Normalizer, dict, None] = None,
        action_dim: Optional[int] = None,
        dim_index: Optional[Sequence[int]] = None,
        format: str = "auto",
        key: Optional[str] = None,
        filter_key: Optional[str] = None,
    ) -> None:
        if pad not in PAD_MODES:
            raise ValueError(f"pad: expected one of {list(PAD_MODES)}, got {pad!r}")
        if not isinstance(step_mask, bool):
            raise TypeError(f"step_mask: expected a bool, got {type(step_mask).__name__}")
        episodes = _as_episodes(source, format, key, filter_key)
        lengths = np.array([ep.length for ep in episodes], dtype=np.int64)
        self.horizon = int(horizon)
        self.pad = pad
        # how the chunks were cut, saved with checkpoints so the prior re-cuts them the same way
        self.chunking = {"horizon": self.horizon, "stride": stride, "pad": pad, "max_pad": max_pad}
        if step_mask:  # recorded only when set: checkpoints without it read as before
            self.chunking["step_mask"] = True
        self.step_mask = step_mask
        self.episode_names = [ep.name for ep in episodes]
        self.episode_lengths = lengths
        self._episode_of_chunk, offsets = chunk_starts(lengths, self.horizon, stride, max_pad)

        frames = np.concatenate([ep.actions for ep in episodes])  # [T_total, D_r]
        if stats is None:
            self.normalizer = Normalizer.fit(frames, normalization)
        else:
            self.normalizer = (
                stats if isinstance(stats, Normalizer) else Normalizer.from_dict(stats)
            )
            if self.normalizer.dim != frames.shape[1]:
                raise ValueError(
                    f"stats: statistics are for {self.normalizer.dim} action dims, the data "
                    f"has {frames.shape[1]}"
                )
        self._frames = np.ascontiguousarray(self.normalizer.normalize(frames), dtype=np.float32)
        ep_first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._chunk_first = ep_first[self._episode_of_chunk] + offsets  # global frame index
        self._chunk_last = (ep_first + lengths - 1)[self._episode_of_chunk]
        self.action_space = ActionSpaceMap(frames.shape[1], action_dim, dim_index)
        self._steps = np.arange(self.horizon, dtype=np.int64)

    # --- shape facts -------------------------------------------------------------------
    @property
    def action_dim(self) -> int:
        """``D``, the unified action dim of every chunk."""
        return self.action_space.action_dim

    @property
    def raw_action_dim(self) -> int:
        """``D_r``, the data's own action dim."""
        return self.action_space.raw_dim

    @property
    def mask(self) -> Tensor:
        """``[D]`` float32, 1 on the dims the data has."""
        return self.action_space.mask

    @property
    def num_episodes(self) -> int:
        return len(self.episode_lengths)

    @property
    def episode_of_chunk(self) -> np.ndarray:
        """``[N]``: the episode each chunk was cut from (for splits that keep episodes whole)."""
        return self._episode_of_chunk

    def __len__(self) -> int:
        return int(self._chunk_first.shape[0])

    # --- access ------------------------------------------------------------------------
    def gather(self, indices: Union[Sequence[int], np.ndarray]) -> tuple[Tensor, ...]:
        """Chunks ``[B, H, D]`` and masks ``[B, D]`` for ``B`` indices, in one lookup (and,
        with ``step_mask``, the real steps ``[B, H]``: 0 on padding)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices: expected a 1-D list, got shape {idx.shape}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"chunk index out of range for {len(self)} chunks")
        rows = self._chunk_first[idx, None] + self._steps  # [B, H]
        last = self._chunk_last[idx, None]
        chunk = self._frames[np.minimum(rows, last)]  # edge padding: repeat the last frame
        if self.pad == "zero":
            chunk[rows > last] = 0.0
        chunk = self.action_space.embed(chunk)
        mask = self.mask.expand(idx.shape[0], -1)
        chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        if not self.step_mask:
            return chunk, mask
        return chunk, mask, torch.from_numpy((rows <= last).astype(np.float32))

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t[0] for t in self.gather([int(index)]))

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, ...]]:
        return list(zip(*(t.unbind(0) for t in self.gather(indices))))

    def describe(self) -> str:
        """One line for logs: episodes, chunks, dims, normalisation, and the episodes too
        short to give a chunk (shorter than H − max_pad), which no chunk comes from."""
        dropped = self.num_episodes - len(np.unique(self._episode_of_chunk))
        short = (
            f" ({dropped} shorter than H - max_pad = "
            f"{self.horizon - self.chunking['max_pad']} steps give no chunk)"
            if dropped
            else ""
        )
        return (
            f"{self.num_episodes} episodes ({int(self.episode_lengths.min())}-"
            f"{int(self.episode_lengths.max())} steps){short}, {len(self)} chunks of "
            f"H={self.horizon}, D_r={self.raw_action_dim} -> D={self.action_dim}, "
            f"{self.normalizer.kind} norm, {self.pad} padding ({self.padded_chunks} chunks "
            f"padded{', padding left out of the loss' if self.step_mask else ''})"
        )

    @property
    def padded_chunks(self) -> int:
        """How many chunks run past their episode's end (have padded steps)."""
        return int((self._chunk_first + self.horizon - 1 > self._chunk_last).sum())
