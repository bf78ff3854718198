"""``.npy`` and ``.npz`` action files.

- ``.npy``: one episode ``[T, D]`` (unmarked, as a flat ``.npz`` array below) or ``N``
  equal-length episodes ``[N, T, D]``.
- ``.npz``: the action array under ``key`` (default: ``actions`` or ``action``), either
  ``[N, T, D]`` or ``[T, D]`` (``[T]``: D = 1). A ``[T, D]`` array is split into episodes by an
  ``episode_ends`` array (cumulative ends, Diffusion Policy's replay-buffer convention)
  or a per-step ``episode_index`` array (LeRobot's convention) when the file has one;
  otherwise it is a single episode, marked ``unmarked``: :func:`~ate_fast.data.read_episodes`
  gives a :class:`SingleEpisodeWarning` when it is all the data read (chunks would cross
  the boundaries of the episodes it may hold; a folder or list of files, one per episode,
  is the normal layout and gives none).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from ate_fast.data.episodes import (
    Episode,
    make_episode,
    split_by_episode_ends,
    split_by_episode_index,
)
from ate_fast.data.errors import DataFormatError

DEFAULT_NPZ_KEYS = ("actions", "action")


def _episodes_from_array(name: str, arr: np.ndarray) -> list[Episode]:
    if arr.ndim == 3:
        return [make_episode(f"{name}[{i}]", arr[i]) for i in range(arr.shape[0])]
    if arr.ndim in (1, 2):  # no episode markers: one episode (read_episodes may warn)
        return [replace(make_episode(name, arr), unmarked=True)]
    raise DataFormatError(
        f"{name}: actions must have rank 2 [T, D] or 3 [N, T, D], got shape {tuple(arr.shape)}"
    )


def read_npy(path: Path) -> list[Episode]:
    """Episodes of a ``.npy`` file (``[T, D]`` or ``[N, T, D]``)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle: refuse, do not execute
        raise DataFormatError(f"{path}: not a plain numeric .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive as well
        arr.close()
        raise DataFormatError(f"{path}: an .npz archive, not an .npy array (use --format npz)")
    return _episodes_from_array(str(path), arr)


def read_npz(path: Path, key: Optional[str] = None) -> list[Episode]:
    """Episodes of a ``.npz`` archive; see the module docstring for the layouts."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataFormatError(f"{path}: cannot read as .npz ({exc})") from exc
    with archive:
        keys = list(archive.keys())
        if key is None:
            key = next((k for k in DEFAULT_NPZ_KEYS if k in keys), None)
            if key is None:
                raise DataFormatError(
                    f"{path}: no action array; expected one of {list(DEFAULT_NPZ_KEYS)} "
                    f"(or pass key=...), found keys {keys}"
                )
        elif key not in keys:
            raise DataFormatError(f"{path}: missing key {key!r}; found keys {keys}")
        arr = archive[key]
        if arr.ndim == 1:  # [T]: one action dimension, split by the markers like [T, D]
            arr = arr[:, None]
        name = f"{path}:{key}"
        if arr.ndim == 2 and "episode_ends" in keys:
            return split_by_episode_ends(name, arr, archive["episode_ends"])
        if arr.ndim == 2 and "episode_index" in keys:
            frames = archive["frame_index"] if "frame_index" in keys else None
            return split_by_episode_index(name, arr, archive["episode_index"], frames)
        return _episodes_from_array(name, arr)
