"""HDF5 action files in the robomimic and ALOHA layouts (read with h5py).

- **robomimic**: one file holds every demo, ``/data/demo_<i>/actions`` ``[T, D]``.
  Demos are read in numeric order (``demo_2`` before ``demo_10``). ``filter_key`` picks
  the demos listed in ``/mask/<filter_key>`` (robomimic's train/valid split).
- **ALOHA** (ACT's recorder): one file per episode, ``/action`` ``[T, D]`` at the root
  (``/observations/...`` beside it is ignored).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from ate_fast.data.episodes import Episode, make_episode
from ate_fast.data.errors import DataFormatError

ROBOMIMIC_KEY = "actions"
ALOHA_KEY = "action"


def _h5py():
    import h5py

    return h5py


def _open(path: Path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot open as HDF5 ({exc})") from exc


def _numeric_suffix(name: str) -> tuple[int, str]:
    match = re.search(r"(\d+)$", name)
    return (int(match.group(1)) if match else -1, name)


def detect_hdf5_layout(path: Path) -> str:
    """``"robomimic"`` if the file has a ``/data`` group, ``"aloha"`` if it has ``/action``."""
    h5py = _h5py()
    with _open(path) as f:
        if isinstance(f.get("data"), h5py.Group):
            return "robomimic"
        if isinstance(f.get(ALOHA_KEY), h5py.Dataset):
            return "aloha"
        raise DataFormatError(
            f"{path}: unknown HDF5 layout; expected a /data group with demo_* (robomimic) "
            f"or an /action dataset (ALOHA), found top-level keys {sorted(f.keys())}"
        )


def _read_dataset(f, path: Path, where: str) -> np.ndarray:
    h5py = _h5py()
    obj = f.get(where)
    if obj is None:
        parent = where.rsplit("/", 1)[0] or "/"
        found = sorted(f[parent].keys()) if parent in f else []
        raise DataFormatError(f"{path}: missing key {where!r}; {parent!r} has {found}")
    if not isinstance(obj, h5py.Dataset):
        raise DataFormatError(f"{path}: {where!r} is a group, expected an action dataset")
    return obj[()]


def read_robomimic(
    path: Path, key: Optional[str] = None, filter_key: Optional[str] = None
) -> list[Episode]:
    """Episodes of a robomimic HDF5 file (``/data/demo_*/<key>``, key default ``actions``)."""
    h5py = _h5py()
    key = key or ROBOMIMIC_KEY
    with _open(path) as f:
        data = f.get("data")
        if not isinstance(data, h5py.Group):
            raise DataFormatError(
                f"{path}: robomimic layout needs a /data group, found {sorted(f.keys())}"
            )
        if filter_key is not None:
            mask = f.get(f"mask/{filter_key}")
            if mask is None:
                found = sorted(f["mask"].keys()) if "mask" in f else []
                raise DataFormatError(
                    f"{path}: filter_key {filter_key!r} not in /mask (found {found})"
                )
            demos = [d.decode() if isinstance(d, bytes) else str(d) for d in mask[()]]
            absent = [d for d in demos if d not in data]
            if absent:
                raise DataFormatError(
                    f"{path}: /mask/{filter_key} lists demos that /data lacks: "
                    f"{absent[:5]}{' ...' if len(absent) > 5 else ''}"
                )
        else:
            demos = [k for k in data.keys() if isinstance(data[k], h5py.Group)]
        demos = sorted(demos, key=_numeric_suffix)
        if not demos:
            raise DataFormatError(f"{path}: /data has no demo groups")
        return [
            make_episode(f"{path}:/data/{d}/{key}", _read_dataset(f, path, f"data/{d}/{key}"))
            for d in demos
        ]


def read_aloha(path: Path, key: Optional[str] = None) -> list[Episode]:
    """The single episode of an ALOHA HDF5 file (``/<key>``, key default ``action``)."""
    key = (key or ALOHA_KEY).lstrip("/")
    with _open(path) as f:
        return [make_episode(f"{path}:/{key}", _read_dataset(f, path, key))]
