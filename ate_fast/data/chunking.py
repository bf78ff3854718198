"""Where action chunks start: episode-boundary aware, strided, with end padding.

A policy with horizon ``H`` predicts a chunk at every step ``t`` of an episode; near the
end ``a[t:t+H]`` runs past the last step and the loader pads it (LeRobot repeats the last
action and flags it; Diffusion Policy limits how much padding a chunk may have). Chunks
never cross into the next episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

PAD_MODES = ("edge", "zero")


def chunk_starts(
    lengths: Sequence[int], horizon: int, stride: int = 1, max_pad: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of every chunk, and the episode each belongs to.

    Args:
        lengths: ``T_e`` of each episode.
        horizon: ``H``, steps per chunk.
        stride: steps between consecutive chunk starts within an episode.
        max_pad: the most padded steps a chunk may have; ``None`` means ``H − 1`` (a
            chunk starts at every step, as LeRobot's loader does); ``0`` means only
            full chunks.

    Returns:
        ``(episode, offset)``: int64 arrays ``[N]``; chunk ``i`` covers steps
        ``offset[i] .. offset[i]+H−1`` of episode ``episode[i]`` (past its end: padding).

    Raises:
        ValueError: bad ``horizon``/``stride``/``max_pad``, or ``horizon`` longer than every
            episode (the longest episode always yields a chunk otherwise).
    """
    if horizon < 1:
        raise ValueError(f"horizon: expected a positive number of steps, got {horizon}")
    if stride < 1:
        raise ValueError(f"stride: expected a positive number of steps, got {stride}")
    max_pad = horizon - 1 if max_pad is None else int(max_pad)
    if not 0 <= max_pad < horizon:
        raise ValueError(f"max_pad: expected 0 <= max_pad < horizon={horizon}, got {max_pad}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("lengths: no episodes")
    longest = int(lengths.max())
    if horizon > longest:
        raise ValueError(
            f"horizon={horizon} is longer than every episode (the longest has {longest} "
            f"steps); use a shorter horizon or longer episodes"
        )
    episodes, offsets = [], []
    for e, length in enumerate(lengths.tolist()):
        last_start = length - horizon + max_pad  # a chunk may run max_pad steps past the end
        if last_start < 0:
            continue
        starts = np.arange(0, min(last_start, length - 1) + 1, stride, dtype=np.int64)
        offsets.append(starts)
        episodes.append(np.full(starts.shape, e, dtype=np.int64))
    return np.concatenate(episodes), np.concatenate(offsets)
