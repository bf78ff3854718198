"""Argument checks for the steer API: clear errors that name the offending argument.

Shape, dtype and choice checks read metadata only. Value checks (NaN, ranges) need the
host to look at device memory, so they are gathered into one synchronisation per call and
skipped where a sync is impossible (torch.compile tracing, CUDA graph capture).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_chunks(**chunks: Tensor) -> None:
    """All arguments are floating tensors of one shape ``[B, H, D]`` on one device."""
    (first_name, first), *rest = chunks.items()
    check_tensor(first_name, first)
    if not first.is_floating_point():
        raise ArgumentTypeError(f"{first_name} must be a floating tensor, got {first.dtype}")
    if first.ndim != 3:
        raise InvalidArgumentError(
            f"{first_name} must be an action chunk [B, H, D], got shape {tuple(first.shape)}"
        )
    for name, t in rest:
        check_tensor(name, t)
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.shape != first.shape:
            raise InvalidArgumentError(
                f"{name} must have {first_name}'s shape {tuple(first.shape)}, got {tuple(t.shape)}"
            )
        if t.device != first.device:
            raise InvalidArgumentError(
                f"{name} must be on {first_name}'s device {first.device}, got {t.device}"
            )


def check_per_sample(name: str, t: object, batch: int) -> Tensor:
    """``t`` is a ``[B]`` tensor (one value per sample; nothing is reshaped silently)."""
    check_tensor(name, t)
    if t.shape != (batch,):
        raise InvalidArgumentError(
            f"{name} must have shape [B] = [{batch}] (one value per sample), got {tuple(t.shape)}"
        )
    return t


def can_sync() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


class ValueCheck(NamedTuple):
    """One :func:`check_values` entry: ``ok`` a 0-dim bool tensor, ``error`` the class
    raised with ``message`` when it is False."""

    message: str
    ok: Tensor
    error: type[InvalidArgumentError] = InvalidArgumentError


def check_values(checks: Sequence[tuple]) -> None:
    """Each check is a :class:`ValueCheck` (or a ``(message, ok)`` pair, raised as
    :class:`~ate_fast.errors.InvalidArgumentError`); one host sync for all. Raises for
    the first that failed."""
    if not checks or not can_sync():
        return
    entries = [ValueCheck(*c) for c in checks]
    device = entries[0].ok.device
    flags = torch.stack([c.ok.reshape(()).to(device) for c in entries]).cpu()
    if bool(flags.all()):
        return
    for check, ok in zip(entries, flags.tolist()):
        if not ok:
            raise check.error(check.message)


def finite(name: str, t: Tensor) -> ValueCheck:
    """A :func:`check_values` entry: ``t`` holds no NaN or inf (else
    :class:`~ate_fast.errors.NonFiniteError`)."""
    return ValueCheck(f"{name} contains NaN or inf", torch.isfinite(t).all(), NonFiniteError)
