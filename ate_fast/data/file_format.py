"""What a file is, from its first bytes (never from its suffix).

:func:`sniff_format` names the container: ``"safetensors"``, ``"torch"`` (a
``torch.save`` zip archive or a legacy pickle), ``"npy"``, ``"npz"``, ``"hdf5"``,
``"parquet"``, ``"json"``, ``"directory"``, or ``"unknown"``. Loaders of user files call
:func:`require_format` and get an :class:`~ate_fast.data.errors.UnknownFileFormatError`
naming the file, what it holds and what was expected, instead of a parser's traceback.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from ate_fast.data.errors import DataFormatError, UnknownFileFormatError

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_NAMES = {
    "safetensors": "a safetensors file",
    "torch": "a torch.save file",
    "npy": "a NumPy .npy array",
    "npz": "a NumPy .npz archive",
    "hdf5": "an HDF5 file",
    "parquet": "a Parquet file",
    "json": "a JSON file",
    "directory": "a directory",
    "unknown": "a file of unknown format",
}
NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
PARQUET_MAGIC = b"PAR1"
# a safetensors file: u64 little-endian header length, then a JSON object of that length
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8) and head[8:9] == b"{"


def _zip_kind(path: Path) -> str:
    """``"npz"`` (every member a ``.npy``), ``"torch"`` (a ``data.pkl`` member) or
    ``"unknown"`` for another zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "unknown"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "unknown"


def sniff_format(path: PathLike) -> str:
    """The format of ``path`` from its content (see the module docstring).

    Raises:
        DataFormatError: ``path`` does not exist.
    """
    p = Path(path)
    if p.is_dir():
        return "directory"
    if not p.is_file():
        raise DataFormatError(f"{p}: no such file or directory")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if head.startswith(ZIP_MAGIC):
        return _zip_kind(p)
    if _is_safetensors(head, size):  # before the pickle test: a header of 640 bytes
        return "safetensors"  # starts with the bytes 80 02, like a pickle stream
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"  # a pickle stream: torch.save's legacy format
    if head.lstrip()[:1] in (b"{", b"["):
        try:
            json.loads(p.read_text(encoding="utf-8"))
            return "json"
        except (ValueError, UnicodeDecodeError):
            pass
    return "unknown"


def describe_format(fmt: str) -> str:
    """``"safetensors"`` → ``"a safetensors file"``."""
    return FORMAT_NAMES.get(fmt, fmt)


def require_format(path: PathLike, accepted: Sequence[str], what: str) -> str:
    """The sniffed format of ``path`` if it is one of ``accepted``.

    Args:
        what: how the message names the file, e.g. ``"--target"``.

    Raises:
        UnknownFileFormatError: another format; the message names the file, the format
            found and the ones expected.
        DataFormatError: the file does not exist.
    """
    fmt = sniff_format(path)
    if fmt not in accepted:
        expected = " or ".join(describe_format(a) for a in accepted)
        raise UnknownFileFormatError(
            f"{what} {path}: expected {expected}, but it is {describe_format(fmt)} "
            f"(formats are told by content, not by the file name)"
        )
    return fmt
