"""The action-dim mask of the unified action space, checked and applied.

A robot with fewer dims than the unified ``D`` has a mask ``[D]`` (or per sample
``[B, D]``) that is 1 on its dims and 0 elsewhere. Encoders see masked dims as 0, and the
reconstruction loss ignores them.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def check_mask(mask: Optional[Tensor], batch: int, action_dim: int) -> Optional[Tensor]:
    """Return ``mask`` as ``[B, D]`` (broadcast from ``[D]``), or ``None``; raise on a bad shape."""
    if mask is None:
        return None
    if mask.dim() == 1 and mask.shape[0] == action_dim:
        return mask.unsqueeze(0).expand(batch, action_dim)
    if mask.dim() == 2 and tuple(mask.shape) == (batch, action_dim):
        return mask
    raise ValueError(
        f"mask: expected shape [D]=[{action_dim}] or [B, D]=[{batch}, {action_dim}], "
        f"got {tuple(mask.shape)}"
    )


def apply_mask(a: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero the masked action dims of ``a [B, H, D]``; ``mask`` is ``[D]`` or ``[B, D]``."""
    mask = check_mask(mask, a.shape[0], a.shape[-1])
    if mask is None:
        return a
    return a * mask.to(a.dtype).unsqueeze(1)
