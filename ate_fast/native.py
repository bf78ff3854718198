"""Lazy loading of the native modules ``ate_fast._C`` (CPU) and ``ate_fast._C_cuda``.

Importing :mod:`ate_fast` never imports, builds or fails because of a native module
(gsplat's pattern). A module is imported on first use; if it is missing or broken,
the caller falls back to the PyTorch reference and one warning names the reason.
"""

from __future__ import annotations

import importlib
import json
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Optional

_PACKAGE_DIR = Path(__file__).resolve().parent
_warned: set[str] = set()


@cache
def build_info() -> dict:
    """What the build produced (written by setup.py), or {} for a source tree never built."""
    path = _PACKAGE_DIR / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@cache
def _load(name: str) -> tuple[Optional[ModuleType], str]:
    try:
        module = importlib.import_module(f"ate_fast.{name}")
    except ImportError as exc:
        if name == "_C_cuda" and build_info() and not build_info().get("cuda_built", False):
            return None, f"CUDA module not built: {build_info().get('cuda_reason', 'unknown')}"
        if not build_info():
            return None, (
                f"native module ate_fast.{name} is not built "
                "(install with `pip install .` or `pip install -e .`)"
            )
        return None, f"native module ate_fast.{name} failed to import: {exc}"
    except Exception as exc:  # a broken binary can raise anything at import time
        return None, f"native module ate_fast.{name} is broken: {type(exc).__name__}: {exc}"
    return module, "ok"


def load(name: str) -> Optional[ModuleType]:
    """The native module ``name`` ("_C" or "_C_cuda"), or None without warning."""
    return _load(name)[0]


def reason(name: str) -> str:
    """Why :func:`load` returned None for ``name`` ("ok" when it loaded)."""
    return _load(name)[1]


def warn_fallback(name: str, backend: str) -> None:
    """Warn once per module that ``backend`` is unavailable and the reference is used."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"ate_fast: {backend} backend unavailable ({reason(name)}); "
        "falling back to the PyTorch reference",
        RuntimeWarning,
        stacklevel=3,
    )
