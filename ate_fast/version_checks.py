"""Release numbers of installed packages, for the features that need a minimum version."""

from __future__ import annotations

import itertools


def release(version: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` → ``(2, 11, 0)``; ``"3.2.0rc1"`` → ``(3, 2, 0)``: the (up to three)
    release numbers a version string starts with."""
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def at_least(version: str, minimum: str) -> bool:
    """Whether ``version`` is ``minimum`` or newer, by release numbers."""
    return release(version) >= release(minimum)
