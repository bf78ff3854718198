"""Settings in force for a block of code, and on disk.

A settings mapping is what the package's paths read from the environment
(``{"ATE_FAST_PREFIX_ATTENTION": "split_sdpa", ...}``): :func:`apply_settings` sets it for
the duration of a ``with`` block and puts every variable back afterwards; a tuned result
is saved as JSON (``ate_fast.settings/1``) with the device, torch and package it was
measured on, and :func:`load_settings` reads it back, checked.

A captured sampler keeps the kernels it recorded: settings must be in force while it is
*captured*; an uncaptured ``sample()`` reads them at every call.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ate_fast._version import __version__
from ate_fast.align.atomic_io import atomic_path
from ate_fast.errors import InvalidArgumentError
from ate_fast.ops import backends
from ate_fast.tuning.switches import KNOWN_VARS, check_settings

FORMAT = "ate_fast.settings/1"
PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def apply_settings(settings: Mapping[str, Optional[str]]) -> Iterator[dict[str, str]]:
    """Set ``settings`` (variable → value; None unsets the variable) in ``os.environ`` for
    the ``with`` block, then restore each variable as it was (also on an exception).
    Process-wide, as the variables are: not for threads that read them meanwhile.
    Yields the checked settings (None entries left out). The backends' cached selections
    are cleared on entry and exit (:func:`ate_fast.ops.backends.reset_caches`), so that
    ops choose again."""
    if not isinstance(settings, Mapping):
        check_settings(settings)  # raises, naming what was expected
    checked = check_settings({var: v for var, v in settings.items() if v is not None})
    unset = [var for var, value in settings.items() if value is None]
    for var in unset:
        if var not in KNOWN_VARS:
            raise InvalidArgumentError(
                f"settings: {var!r} is not one of the package's settings; expected one of "
                f"{sorted(KNOWN_VARS)}"
            )
    saved = {var: os.environ.get(var) for var in (*checked, *unset)}
    try:
        for var in unset:
            os.environ.pop(var, None)
        os.environ.update(checked)
        backends.reset_caches()
        yield checked
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        backends.reset_caches()


def device_name(device: torch.device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``) or the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def save_settings(path: PathLike, settings: Mapping[str, str], **record: Any) -> Path:
    """Write ``settings`` (checked) to ``path`` as JSON, atomically, with ``record`` (e.g.
    the device and the timings; JSON-serialisable) and the torch and package versions."""
    document = {
        "format": FORMAT,
        "settings": check_settings(settings),
        "torch": torch.__version__,
        "ate_fast": __version__,
        **record,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def read_document(path: PathLike) -> dict[str, Any]:
    """The JSON document :func:`save_settings` wrote, its format and settings checked."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"settings file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # text, or another kind of file
        raise InvalidArgumentError(f"{path}: not a JSON settings file ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise InvalidArgumentError(f"{path}: expected format {FORMAT!r}, got {found!r}")
    document["settings"] = check_settings(document.get("settings"), f"{path}: settings")
    return document


def load_settings(path: PathLike, device: Optional[torch.device] = None) -> dict[str, str]:
    """The settings saved at ``path`` (:func:`save_settings`, ``ate-fast tune``), checked.
    ``device``: warn where they were measured on another device (they stay valid there,
    only perhaps not the fastest)."""
    document = read_document(path)
    warn_if_tuned_elsewhere(path, document, device, stacklevel=3)
    return document["settings"]


def warn_if_tuned_elsewhere(
    path: PathLike, document: Mapping[str, Any], device: Optional[torch.device], stacklevel=2
) -> None:
    """Warn where ``document`` (:func:`read_document` of ``path``) was measured on another
    device than ``device`` (None: no check). The settings stay valid there, only perhaps not
    the fastest."""
    measured_on = document.get("device")
    if device is not None and measured_on is not None:
        here = device_name(torch.device(device))
        if here != measured_on:
            warnings.warn(
                f"{path}: these settings were tuned on {measured_on}, this is {here}: they "
                "work here but may not be the fastest (run ate_fast.tuning.autotune again)",
                stacklevel=stacklevel,
            )
