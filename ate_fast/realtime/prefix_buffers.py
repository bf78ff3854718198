"""The previous chunk and its per-delay rows in static buffers, shared by
:class:`~ate_fast.realtime.RTCGuidance` (a soft mask) and
:class:`~ate_fast.realtime.PrefixInpainting` (a hard one).

Both keep Y [B, H, D] and a row buffer [B, H, 1] that a captured loop reads, and overwrite
them in place each control tick from a table with one row per delay, so one capture serves
every tick and every delay: :func:`write_prefix` is that write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, NonFiniteError

Delay = Union[int, Sequence[int], Tensor]


def check_chunk(prev_chunk: object, check_finite: bool) -> Tensor:
    """``prev_chunk`` checked as a non-empty floating [B, H, D] tensor with H ≥ 2 (and
    finite, with ``check_finite``); errors name the argument."""
    if not isinstance(prev_chunk, Tensor):
        raise ArgumentTypeError(
            f"prev_chunk must be a torch.Tensor [B, H, D], got {type(prev_chunk).__name__}"
        )
    if prev_chunk.ndim != 3 or prev_chunk.numel() == 0:
        raise InvalidArgumentError(
            f"prev_chunk must be a non-empty [B, H, D] tensor, got shape {tuple(prev_chunk.shape)}"
        )
    if not prev_chunk.is_floating_point():
        raise ArgumentTypeError(f"prev_chunk must be floating, got {prev_chunk.dtype}")
    if prev_chunk.shape[1] < 2:
        raise InvalidArgumentError(
            "prev_chunk must have a horizon H >= 2 (shape [B, H, D]), got "
            f"{tuple(prev_chunk.shape)}"
        )
    if check_finite and not bool(torch.isfinite(prev_chunk).all()):
        raise NonFiniteError("prev_chunk contains NaN or inf (expected finite actions)")
    return prev_chunk


def delay_list(delay: Delay, batch: int, high: int, why: str = "") -> list[int]:
    """``delay`` (an int, B ints, or an int CPU tensor [] / [B]) as B ints in ``0..high``."""
    if isinstance(delay, Tensor):
        if delay.device.type != "cpu" or delay.dtype.is_floating_point or delay.ndim > 1:
            raise InvalidArgumentError(
                "delay as a tensor must be an integer CPU tensor [] or [B] (its range is "
                f"checked on the host), got {delay.dtype} {tuple(delay.shape)} on {delay.device}"
            )
        delay = delay.tolist()
    if isinstance(delay, (int, np.integer)) and not isinstance(delay, bool):
        return [check_int("delay", delay, 0, high, why)] * batch
    if not isinstance(delay, Sequence) or isinstance(delay, (str, bytes)):
        raise ArgumentTypeError(
            f"delay must be an int or a sequence of B ints, got {type(delay).__name__}"
        )
    if len(delay) != batch:
        raise InvalidArgumentError(
            f"delay must have one entry per sample (B = {batch}), got {len(delay)}"
        )
    return [check_int(f"delay[{b}]", d, 0, high, why) for b, d in enumerate(delay)]


def write_prefix(
    owner: str,
    prev_chunk: Tensor,
    delay: Delay,
    y: Tensor,
    rows: Tensor,
    table: Tensor,
    why: str = "",
) -> list[int]:
    """Copy ``prev_chunk`` into ``y`` [B, H, D] and the table's rows for ``delay`` into
    ``rows`` [B, H, 1], in place (rows picked on the table's device: no host sync for one
    delay; B different delays reach a GPU as a small blocking copy, a host sync). Returns
    the B delays. ``owner`` names the object in the error for a changed shape or dtype."""
    if prev_chunk.shape != y.shape or prev_chunk.dtype != y.dtype:
        raise InvalidArgumentError(
            f"prev_chunk must keep the shape and dtype of the first one, {tuple(y.shape)} "
            f"{y.dtype} (captured loops read these buffers); got {tuple(prev_chunk.shape)} "
            f"{prev_chunk.dtype}: build a new {owner}"
        )
    batch = y.shape[0]
    delays = delay_list(delay, batch, table.shape[0] - 1, why)
    if len(set(delays)) == 1:
        picked = table[delays[0]].expand(batch, -1)
    else:
        picked = table[torch.tensor(delays, device=table.device)]
    with torch.no_grad():  # values only: a prev_chunk with autograd history would chain
        # every later tick's copy onto it and keep its graph alive as long as the buffers
        y.copy_(prev_chunk)
        rows.copy_(picked.unsqueeze(-1).expand_as(rows))
    return delays
