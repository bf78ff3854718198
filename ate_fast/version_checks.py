"""Release numbers of installed packages, for the features that need a minimum version."""

from __future__ import annotations

import re


def release(text: str, package: str) -> tuple[int, int, int]:
    """``"2.11.0+cu130"`` → ``(2, 11, 0)``, ``"10.13"`` → ``(10, 13, 0)``: the release
    numbers a version string starts with; ValueError naming ``package`` for anything else."""
    match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        raise ValueError(f"cannot read a {package} version from {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def at_least(version: str, minimum: str, package: str) -> bool:
    """Whether ``package``'s ``version`` is ``minimum`` or newer, by release numbers."""
    return release(version, package) >= release(minimum, package)
