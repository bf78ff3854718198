"""LeRobot datasets: parquet files with an ``action`` column and ``episode_index``.

A LeRobot dataset directory holds ``meta/info.json`` and ``data/chunk-*/...parquet``
(v2: one file per episode; v3: several episodes per file). Every row is one frame;
``action`` is a fixed- or variable-size list of floats, ``episode_index`` names the
episode and ``frame_index`` (when present) orders the frames within it. The path may
also be a single ``.parquet`` file or any directory of them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ate_fast.data.episodes import Episode, split_by_episode_index
from ate_fast.data.errors import DataFormatError

LEROBOT_KEY = "action"


def is_lerobot_dir(path: Path) -> bool:
    """A directory with ``meta/info.json`` or parquet files under ``data/``, or a dataset's
    ``data/`` folder itself (parquet files in ``chunk-*/`` folders)."""
    return path.is_dir() and (
        (path / "meta" / "info.json").is_file()
        or any((path / "data").rglob("*.parquet"))
        or any(path.glob("chunk-*/*.parquet"))
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
    """``table[key]`` as ``[rows, width]`` in the column's own dtype (float32 stays float32:
    the episodes are float32, and an up-cast would double a large dataset's memory)."""
    import pyarrow as pa

    if key not in table.column_names:
        raise DataFormatError(f"{file}: missing column {key!r}; columns are {table.column_names}")
    column = table.column(key)
    kind = column.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if column.null_count:
            raise DataFormatError(f"{file}: column {key!r} has {column.null_count} null rows")
        parts = []
        for chunk in column.chunks:  # chunk by chunk: no combined copy of the column
            lengths = np.asarray(chunk.value_lengths())
            parts.append((lengths, chunk.flatten().to_numpy(zero_copy_only=False)))
        lengths = np.concatenate([n for n, _ in parts]) if parts else np.zeros(0, np.int32)
        if lengths.size and (lengths != lengths[0]).any():
            raise DataFormatError(
                f"{file}: column {key!r} has rows of different lengths "
                f"{sorted(set(lengths.tolist()))[:5]}"
            )
        width = int(lengths[0]) if lengths.size else 0
        values = [v for _, v in parts]
        flat = values[0] if len(values) == 1 else np.concatenate(values) if values else np.zeros(0)
        return flat.reshape(len(column), width)
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):
        return column.to_numpy()[:, None]
    raise DataFormatError(f"{file}: column {key!r} has type {kind}, expected a list of floats")


def _check_frame_count(path: Path, rows: int) -> None:
    """Warn when the rows read differ from ``meta/info.json``'s ``total_frames`` (files
    missing, or others beside the dataset's)."""
    info = path / "meta" / "info.json"
    if not path.is_dir() or not info.is_file():
        return
    try:
        total = json.loads(info.read_text()).get("total_frames")
    except (ValueError, OSError):
        return  # the format's reader needs only data/; a broken info.json is not its error
    if isinstance(total, int) and total != rows:
        warnings.warn(
            f"{path}: read {rows} frames, but meta/info.json says total_frames={total} "
            "(files missing from data/, or others beside the dataset's)",
            UserWarning,
            stacklevel=3,
        )


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
    _check_frame_count(path, sum(len(a) for a in actions))
    merged = actions[0] if len(actions) == 1 else np.concatenate(actions)
    if not merged.flags.writeable:  # a view of Arrow's buffer: the episodes own their data
        merged = merged.copy()
    return split_by_episode_index(
        f"{path}:{key}",
        merged,
        np.concatenate(episode_index),
        np.concatenate(frame_index) if has_frames else None,
    )
