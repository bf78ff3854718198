"""The scalar argument checks every layer shares: an int in a range, one of a few choices,
a float, an ``ATE_FAST_*`` setting naming one of a few paths. Errors name the argument,
what was expected and what came (:mod:`ate_fast.errors`); nothing is coerced that could
lose what the caller meant — a bool is no int (``True`` would pass as 1), a float is no int
choice (``2.0`` would pass as 2), a NumPy scalar is taken as the Python number it holds.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Sequence
from typing import Optional, TypeVar

import numpy as np

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError

T = TypeVar("T")


def is_int(value: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(
    name: str, value: object, low: Optional[int] = None, high: Optional[int] = None, why: str = ""
) -> int:
    """``value`` as an int in ``low..high`` (either bound None: open); ``why`` is added to
    the range in the error (e.g. which other argument sets the bound)."""
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            expected = f">= {low}"
        elif low is None:
            expected = f"<= {high}"
        else:
            expected = f"in [{low}, {high}]"
        raise InvalidArgumentError(f"{name} must be {expected}{why}, got {value}")
    return int(value)


def _same_kind(value: object, choice: object) -> bool:
    """Whether ``value`` may be compared with ``choice`` at all: strings with strings, ints
    with ints (bools and floats are neither)."""
    if isinstance(choice, str):
        return isinstance(value, str)
    if isinstance(choice, bool):
        return isinstance(value, (bool, np.bool_))
    if isinstance(choice, int):
        return is_int(value)
    return not isinstance(value, np.ndarray)


def check_choice(name: str, value: T, choices: Sequence[object], why: str = "") -> T:
    """``value`` if it is one of ``choices`` (the same kind: ``True`` is not the choice 1,
    ``2.0`` not the choice 2); else an error listing them, ``why`` after the list."""
    if not any(_same_kind(value, c) and value == c for c in choices):
        raise InvalidArgumentError(f"{name} must be one of {tuple(choices)}{why}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    low: Optional[float] = None,
    *,
    above: bool = False,
    allow_inf: bool = False,
    why: str = "",
) -> float:
    """``value`` as a float, ``>= low`` (``above``: ``> low``) when ``low`` is given; finite
    unless ``allow_inf`` (e.g. a clamp, where ``math.inf`` means none); never NaN. A bool or
    a non-number is an :class:`~ate_fast.errors.ArgumentTypeError`; ``why`` is added to the
    expected range in the error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise InvalidArgumentError(f"{name} must be finite{why}, got {value!r}")
    if low is not None and (value <= low if above else value < low):
        expected = f"{'>' if above else '>='} {low}{why}"
        raise InvalidArgumentError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def env_choice(var: str, choices: Sequence[str]) -> str:
    """``$var`` (trimmed, lower case) as one of ``choices``, the first where unset or empty;
    anything else raises, naming the variable and the choices."""
    value = os.environ.get(var, "").strip().lower() or choices[0]
    if value not in choices:
        raise InvalidArgumentError(f"{var}: expected one of {list(choices)}, got {value!r}")
    return value


@functools.lru_cache(maxsize=16)
def int_pairs(var: str, text: str, fields: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """``text`` (the value of ``$var``) as comma-separated ``key=value`` pairs, each key one
    of ``fields`` and each value a whole number, e.g. ``block_q=32,splits=4``; anything
    else raises, naming the variable, the keys and the pair. Parsed once per text (a
    setting read per eager call costs a dict lookup)."""
    pairs = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        key = key.strip()
        if key not in fields or not value.strip().isdigit():
            raise InvalidArgumentError(
                f"{var}: expected comma-separated key=value pairs with keys in "
                f"{list(fields)} and whole numbers, got {pair!r} in {text!r}"
            )
        pairs[key] = int(value)
    return tuple(pairs.items())
