"""Module-level ``__getattr__`` / ``__dir__`` for packages whose public names import on
first access (so that importing the package, or its CLI, stays cheap)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, Callable


def lazy_attributes(
    namespace: dict, names: Mapping[str, str], subpackages: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package whose ``globals()`` is ``namespace``.

    ``names`` maps a public name to the full module that defines it; ``subpackages`` are
    submodule names reachable as attributes. A resolved value is cached in ``namespace``,
    so later lookups skip ``__getattr__``.
    """
    package = namespace["__name__"]
    modules = tuple(subpackages)

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif name in modules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(modules))

    return __getattr__, __dir__
