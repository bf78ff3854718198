"""Input checks shared by the reference heads (metadata only: no host sync, so they run
inside CUDA graph capture and torch.compile without breaking the graph)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast.errors import MissingConditionError


def check_head_inputs(
    head: str,
    x: Tensor,
    t: Tensor,
    cond: Optional[Tensor],
    horizon: int,
    action_dim: int,
    cond_shape: Optional[tuple[int, ...]],
    cond_required: bool = False,
    weight_dtype: Optional[torch.dtype] = None,
) -> None:
    """``x`` [B, H, D], ``t`` [B], ``cond`` [B, *cond_shape] (or None when ``cond_shape`` is
    None; ``-1`` in ``cond_shape`` matches any size).

    ``cond_required`` (a head built with ``cond_dim > 0``): a missing ``cond`` raises
    :class:`~ate_fast.errors.MissingConditionError` instead of silently meaning zeros.
    ``cond`` may have ``x``'s dtype or ``weight_dtype`` (the head's, when it differs)."""
    if x.ndim != 3 or x.shape[1] != horizon or x.shape[2] != action_dim:
        raise ValueError(
            f"{head}: x must have shape [B, H, D] = [B, {horizon}, {action_dim}], got "
            f"{tuple(x.shape)}"
        )
    batch = x.shape[0]
    if t.shape != (batch,):
        raise ValueError(f"{head}: t must have shape [B] = [{batch}], got {tuple(t.shape)}")
    if cond_shape is None:
        if cond is not None:
            raise ValueError(
                f"{head}: this head was configured without conditioning (cond_dim=0); got a "
                f"cond of shape {tuple(cond.shape)}"
            )
        return
    if cond is None:
        if cond_required:
            raise MissingConditionError(
                f"{head}: cond is None but this head was built with cond_dim = "
                f"{cond_shape[-1]}: pass cond [B, {cond_shape[-1]}] (e.g. "
                "sampler.sample(noise, cond)), or build the head with cond_dim=0"
            )
        return  # optional token context (the flow transformer): no context
    expected = (batch, *cond_shape)
    if cond.ndim != len(expected) or any(e != -1 and e != s for e, s in zip(expected, cond.shape)):
        shown = ", ".join("L" if e == -1 else str(e) for e in expected)
        raise ValueError(f"{head}: cond must have shape [{shown}], got {tuple(cond.shape)}")
    if cond.dtype not in (x.dtype, weight_dtype) or cond.device != x.device:
        also = "" if weight_dtype in (None, x.dtype) else f" or the head's {weight_dtype}"
        raise ValueError(
            f"{head}: cond must have x's dtype{also} and x's device ({x.dtype}, {x.device}), "
            f"got ({cond.dtype}, {cond.device})"
        )


def in_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in the head's compute dtype (mixed precision: bf16/fp16 weights and
    activations for a float32 sampler state); a no-op when it already is."""
    return None if t is None else t.to(dtype)
