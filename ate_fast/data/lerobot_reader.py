"""LeRobot datasets: parquet files with an ``action`` column and ``episode_index``.

A LeRobot dataset directory holds ``meta/info.json`` and ``data/chunk-*/...parquet``
(v2: one file per episode; v3: several episodes per file). Every row is one frame;
``action`` is a fixed- or variable-size list of floats, ``episode_index`` names the
episode and ``frame_index`` (when present) orders the frames within it. The path may
also be a single ``.parquet`` file or any directory of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ate_fast.data.episodes import Episode, split_by_episode_index
from ate_fast.data.errors import DataFormatError

LEROBOT_KEY = "action"


def is_lerobot_dir(path: Path) -> bool:
    """A directory with ``meta/info.json`` or parquet files under ``data/``."""
    return path.is_dir() and (
        (path / "meta" / "info.json").is_file() or any((path / "data").rglob("*.parquet"))
    )


def parquet_files(path: Path) -> list[Path]:
    """The parquet files of a LeRobot dataset (or of a plain directory), sorted."""
    if path.is_file():
        return [path]
    root = path / "data" if (path / "data").is_dir() else path
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise DataFormatError(f"{path}: no .parquet files found under {root}")
    return files


def _column_to_array(file: Path, table, key: str) -> np.ndarray:
    import pyarrow as pa

    if key not in table.column_names:
        raise DataFormatError(f"{file}: missing column {key!r}; columns are {table.column_names}")
    col = table.column(key).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or (pa.types.is_fixed_size_list(col.type))
    ):
        if col.null_count:
            raise DataFormatError(f"{file}: column {key!r} has {col.null_count} null rows")
        lengths = np.asarray(col.value_lengths())
        if lengths.size and (lengths != lengths[0]).any():
            raise DataFormatError(
                f"{file}: column {key!r} has rows of different lengths "
                f"{sorted(set(lengths.tolist()))[:5]}"
            )
        width = int(lengths[0]) if lengths.size else 0
        values = col.flatten().to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64).reshape(len(col), width)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)[:, None]
    raise DataFormatError(f"{file}: column {key!r} has type {col.type}, expected a list of floats")


def read_lerobot(path: Path, key: Optional[str] = None) -> list[Episode]:
    """Episodes of a LeRobot dataset directory or parquet file (key default ``action``)."""
    import pyarrow.parquet as pq

    key = key or LEROBOT_KEY
    actions, episode_index, frame_index = [], [], []
    has_frames = True
    for file in parquet_files(path):
        try:
            schema = pq.read_schema(file)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataFormatError(f"{file}: cannot read as parquet ({exc})") from exc
        if "episode_index" not in schema.names:
            raise DataFormatError(
                f"{file}: missing column 'episode_index'; columns are {schema.names}"
            )
        if key not in schema.names:
            raise DataFormatError(f"{file}: missing column {key!r}; columns are {schema.names}")
        has_frames = has_frames and "frame_index" in schema.names
        cols = [key, "episode_index"] + (["frame_index"] if "frame_index" in schema.names else [])
        table = pq.read_table(file, columns=cols)
        actions.append(_column_to_array(file, table, key))
        episode_index.append(table.column("episode_index").to_numpy())
        if "frame_index" in schema.names:
            frame_index.append(table.column("frame_index").to_numpy())
    widths = {a.shape[1] for a in actions}
    if len(widths) > 1:
        raise DataFormatError(f"{path}: files disagree on the width of {key!r}: {sorted(widths)}")
    return split_by_episode_index(
        f"{path}:{key}",
        np.concatenate(actions),
        np.concatenate(episode_index),
        np.concatenate(frame_index) if has_frames else None,
    )
