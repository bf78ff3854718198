"""One entry point for every supported file format: :func:`read_episodes`."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from ate_fast.argument_checks import check_choice
from ate_fast.data.episodes import Episode, check_consistent_dim
from ate_fast.data.errors import DataFormatError, SingleEpisodeWarning
from ate_fast.data.file_format import require_format, sniff_format
from ate_fast.data.hdf5_reader import detect_hdf5_layout, read_aloha, read_robomimic
from ate_fast.data.lerobot_reader import is_lerobot_dir, read_lerobot
from ate_fast.data.numpy_reader import read_npy, read_npz

FORMATS = ("auto", "npz", "npy", "robomimic", "aloha", "lerobot")
HDF5_SUFFIXES = (".hdf5", ".h5", ".he5")
FILE_SUFFIXES = (".npz", ".npy", ".parquet", *HDF5_SUFFIXES)

PathLike = Union[str, "os.PathLike[str]"]


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


# the content a file holds -> the reader for it (HDF5: the layout from the file's keys)
CONTENT_FORMATS = {"npz": "npz", "npy": "npy", "parquet": "lerobot", "hdf5": "hdf5"}
SUFFIX_FORMATS = {".npz": "npz", ".npy": "npy", **{s: "hdf5" for s in HDF5_SUFFIXES}}


def _format_of_file(path: Path) -> str:
    """The reader for ``path``, told by its content (not its suffix). A file whose content
    is unrecognised but whose suffix names a format goes to that reader, which says what
    is wrong with it (a corrupt HDF5 file, ...)."""
    if sniff_format(path) == "unknown" and path.suffix.lower() in SUFFIX_FORMATS:
        fmt = SUFFIX_FORMATS[path.suffix.lower()]
    else:
        fmt = require_format(path, tuple(CONTENT_FORMATS), "data file")
    if fmt == "hdf5":
        return detect_hdf5_layout(path)
    return CONTENT_FORMATS[fmt]


def _read_file(path: Path, fmt: str, key: Optional[str], filter_key: Optional[str]):
    if fmt == "auto":
        fmt = _format_of_file(path)
    if filter_key is not None and fmt != "robomimic":
        raise DataFormatError(
            f"{path}: filter_key {filter_key!r} applies to robomimic HDF5 files only "
            f"(their /mask/<filter_key> demo lists); this file reads as {fmt}"
        )
    if fmt == "npz":
        return read_npz(path, key)
    if fmt == "npy":
        return read_npy(path)
    if fmt == "robomimic":
        return read_robomimic(path, key, filter_key)
    if fmt == "aloha":
        return read_aloha(path, key)
    return read_lerobot(path, key)


def _read_path(
    p: Path, format: str, key: Optional[str], filter_key: Optional[str]
) -> list[Episode]:
    """The episodes of one file or directory (see :func:`read_episodes`)."""
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or directory")
    if p.is_dir() and (format == "lerobot" or (format == "auto" and is_lerobot_dir(p))):
        if filter_key is not None:
            raise DataFormatError(f"{p}: filter_key applies to robomimic HDF5 files only")
        return read_lerobot(p, key)
    if not p.is_dir():
        return _read_file(p, format, key, filter_key)
    files = sorted((f for f in p.iterdir() if f.suffix.lower() in FILE_SUFFIXES), key=_natural_key)
    if not files:
        raise DataFormatError(
            f"{p}: directory has no action files (expected {list(FILE_SUFFIXES)})"
        )
    return [ep for f in files for ep in _read_file(f, format, key, filter_key)]


def read_episodes(
    path: Union[PathLike, Sequence[PathLike]],
    format: str = "auto",
    key: Optional[str] = None,
    filter_key: Optional[str] = None,
) -> list[Episode]:
    """Read every episode's actions ``[T, D_r]`` from one or more paths.

    Args:
        path: a file, a directory, or a list of them. A directory is a LeRobot dataset
            if it has ``meta/info.json`` or ``data/**/*.parquet``; otherwise every
            ``.npz/.npy/.hdf5/.h5/.parquet`` file in it is read, in natural order
            (``episode_2`` before ``episode_10``; the ALOHA one-file-per-episode layout).
        format: ``"auto"`` (from the content; HDF5 layout from the file's keys), ``"npz"``,
            ``"npy"``, ``"robomimic"``, ``"aloha"`` or ``"lerobot"``.
        key: the action array's name inside the file (defaults: npz ``actions``/``action``,
            robomimic ``actions``, ALOHA ``action``, LeRobot ``action``).
        filter_key: robomimic only: read the demos listed in ``/mask/<filter_key>``.

    Raises:
        UnknownFileFormatError: (``format="auto"``) a file that is none of the formats.
        DataFormatError: missing file/key, wrong rank, non-finite actions, episodes with
            different action dims; the message names the file and what was expected.
    """
    check_choice("format", format, tuple(FORMATS))
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("path: expected at least one file or directory, got an empty list")
    episodes = [ep for raw in paths for ep in _read_path(Path(raw), format, key, filter_key)]
    if len(episodes) == 1 and episodes[0].unmarked:  # a folder of such files is the layout
        only = episodes[0]
        warnings.warn(
            f"{only.name}: the array {tuple(only.actions.shape)} has no episode markers, so "
            "it is read as ONE episode and action chunks may cross episode boundaries. If "
            "it holds several, mark them with an 'episode_ends' array (cumulative end index "
            "of each episode) or a per-step 'episode_index' array in an .npz, or store the "
            "actions as [N, T, D].",
            SingleEpisodeWarning,
            stacklevel=2,
        )
    check_consistent_dim(episodes, ", ".join(str(p) for p in paths))
    return episodes
