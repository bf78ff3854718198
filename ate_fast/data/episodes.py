"""Episodes: the unit every reader returns, and the checks applied to each.

An episode is one demonstration's action sequence ``[T, D_r]`` (``T`` steps, the robot's
own action dim ``D_r``). Chunking, normalisation and the unified action space are built
on a list of these, whatever file format they came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ate_fast.data.errors import DataFormatError


@dataclass(frozen=True)
class Episode:
    """One demonstration: ``actions`` is ``[T, D_r]`` float32; ``name`` says where it came
    from; ``unmarked``: a file's flat array without episode markers, read as this one
    episode (it may hold several)."""

    name: str
    actions: np.ndarray
    unmarked: bool = False

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def make_episode(name: str, actions: object) -> Episode:
    """Check one episode's array and return it as float32 ``[T, D_r]``.

    A 1-D array is a single-dimension action sequence and becomes ``[T, 1]``. Any other
    rank, an empty episode, a non-numeric dtype or a NaN/inf value is an error that names
    the episode and the first bad index.
    """
    arr = np.asarray(actions)
    if arr.dtype.kind not in "fiub":
        raise DataFormatError(f"{name}: actions must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataFormatError(
            f"{name}: actions must have rank 2 [T, D] (or 1 for a 1-D action), "
            f"got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataFormatError(f"{name}: empty episode, shape {tuple(arr.shape)}")
    _check_float32_range(name, arr)
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        t, d = np.argwhere(~finite)[0]
        raise DataFormatError(
            f"{name}: non-finite action {arr[t, d]} at step {t}, dim {d} "
            f"({int((~finite).sum())} non-finite values in the episode)"
        )
    return Episode(name, np.ascontiguousarray(arr))


# integers beyond ±2**24 are not all float32 numbers: they would be rounded
FLOAT32_EXACT_INT = 2**24


def _check_float32_range(name: str, arr: np.ndarray) -> None:
    """Refuse values that float32 cannot hold: finite float64 beyond its range (they would
    become inf and be blamed on the file) and integers it would round."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
        with np.errstate(invalid="ignore"):
            over = np.abs(arr) > np.finfo(np.float32).max
        over &= np.isfinite(arr)
        if over.any():
            t, d = np.argwhere(over)[0]
            raise DataFormatError(
                f"{name}: action {arr[t, d]:g} at step {t}, dim {d} is beyond float32's range "
                f"(±{np.finfo(np.float32).max:.3g}); rescale the actions"
            )
    elif arr.dtype.kind in "iu" and arr.dtype.itemsize > 2:
        big = (arr > FLOAT32_EXACT_INT) | (arr < -FLOAT32_EXACT_INT)
        if big.any():
            t, d = np.argwhere(big)[0]
            raise DataFormatError(
                f"{name}: integer action {arr[t, d]} at step {t}, dim {d} is beyond ±2**24, "
                "where float32 rounds integers; rescale the actions"
            )


def check_consistent_dim(episodes: Sequence[Episode], source: str) -> int:
    """All episodes of one dataset must share ``D_r``; return it."""
    if not episodes:
        raise DataFormatError(f"{source}: no episodes found")
    dim = episodes[0].actions.shape[1]
    for ep in episodes[1:]:
        if ep.actions.shape[1] != dim:
            raise DataFormatError(
                f"{source}: episodes have different action dims: {episodes[0].name} has "
                f"{dim}, {ep.name} has {ep.actions.shape[1]}"
            )
    return int(dim)


def split_by_episode_ends(name: str, actions: np.ndarray, ends: np.ndarray) -> list[Episode]:
    """Split a concatenated ``[T_total, D]`` array at cumulative ``episode_ends``.

    The convention of Diffusion Policy's replay buffer: ``ends[i]`` is one past the last
    step of episode ``i`` and the last end equals ``T_total``.
    """
    ends = np.asarray(ends).astype(np.int64).ravel()
    total = actions.shape[0]
    if ends.size == 0 or np.any(np.diff(ends) <= 0) or ends[0] <= 0 or ends[-1] != total:
        raise DataFormatError(
            f"{name}: episode_ends must be strictly increasing positive offsets ending at "
            f"the number of steps {total}, got {ends.tolist()[:8]}{'...' if ends.size > 8 else ''}"
        )
    starts = np.concatenate([[0], ends[:-1]])
    return [
        make_episode(f"{name}[{i}]", actions[s:e]) for i, (s, e) in enumerate(zip(starts, ends))
    ]


def split_by_episode_index(
    name: str, actions: np.ndarray, episode_index: np.ndarray, frame_index: np.ndarray | None = None
) -> list[Episode]:
    """Group per-step rows by ``episode_index`` (sorted by ``frame_index`` when given).

    The LeRobot convention: every row carries the episode it belongs to; rows of one
    episode need not be contiguous in the file.
    """
    episode_index = np.asarray(episode_index).astype(np.int64).ravel()
    if episode_index.shape[0] != actions.shape[0]:
        raise DataFormatError(
            f"{name}: episode_index has {episode_index.shape[0]} rows but actions has "
            f"{actions.shape[0]}"
        )
    if frame_index is not None:
        frame_index = np.asarray(frame_index).astype(np.int64).ravel()
        order = np.lexsort((frame_index, episode_index))
    else:
        order = np.argsort(episode_index, kind="stable")
    if (np.diff(order) != 1).any():  # rows out of order; in order (the usual case): no copy
        actions = actions[order]
    sorted_ids = episode_index[order]
    if frame_index is not None:
        _check_no_repeated_frames(name, sorted_ids, frame_index[order])
    cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
    bounds = np.concatenate([[0], cuts, [len(sorted_ids)]])
    return [
        make_episode(f"{name}[episode {int(sorted_ids[s])}]", actions[s:e])
        for s, e in zip(bounds[:-1], bounds[1:])
    ]


def _check_no_repeated_frames(name: str, episode: np.ndarray, frame: np.ndarray) -> None:
    """Two rows with one (episode, frame): a copy of an episode's file beside it, or two
    dataset versions in one folder; read anyway, its frames would interleave."""
    same = (np.diff(episode) == 0) & (np.diff(frame) == 0)
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise DataFormatError(
            f"{name}: episode {int(episode[i])} has frame {int(frame[i])} more than once "
            f"({int(same.sum())} repeated (episode_index, frame_index) rows): is an episode's "
            "file there twice, or two versions of the dataset?"
        )
