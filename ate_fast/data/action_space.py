"""The unified action space: a robot's ``D_r`` dims placed into a shared ``D``, plus a mask.

Cross-embodiment VLAs (RDT's 128-dim state vector, π0's 32 dims) give every robot the same
action width; a robot fills the dims it has and the rest are zero and masked out of the
loss. ``dim_index[j]`` is where the robot's j-th action dim goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from torch import Tensor


class ActionSpaceMap:
    """Maps ``[..., D_r]`` into ``[..., D]`` (zeros elsewhere) and back.

    Args:
        raw_dim: ``D_r``, the robot's action dim.
        action_dim: ``D``, the unified dim (default ``D_r``: identity map).
        dim_index: ``D_r`` distinct indices in ``[0, D)`` (default ``0..D_r−1``).
    """

    def __init__(
        self,
        raw_dim: int,
        action_dim: Optional[int] = None,
        dim_index: Optional[Sequence[int]] = None,
    ) -> None:
        action_dim = raw_dim if action_dim is None else int(action_dim)
        if dim_index is None:
            if action_dim < raw_dim:
                raise ValueError(
                    f"action_dim: the unified dim {action_dim} is smaller than the data's "
                    f"action dim {raw_dim}"
                )
            dim_index = range(raw_dim)
        index = np.asarray(list(dim_index), dtype=np.int64)
        if index.shape != (raw_dim,):
            raise ValueError(
                f"dim_index: expected {raw_dim} indices (one per data action dim), got "
                f"{index.shape[0]}"
            )
        if len(set(index.tolist())) != raw_dim or index.min() < 0 or index.max() >= action_dim:
            raise ValueError(
                f"dim_index: expected {raw_dim} distinct indices in [0, {action_dim}), "
                f"got {index.tolist()}"
            )
        self.raw_dim = int(raw_dim)
        self.action_dim = action_dim
        self.dim_index = index
        mask = np.zeros(action_dim, dtype=np.float32)
        mask[index] = 1.0
        self.mask = torch.from_numpy(mask)  # [D], 1 where the robot has a dim

    @property
    def is_identity(self) -> bool:
        return self.action_dim == self.raw_dim and bool(
            (self.dim_index == np.arange(self.raw_dim)).all()
        )

    def embed(self, x: np.ndarray) -> np.ndarray:
        """``[..., D_r]`` → ``[..., D]``."""
        if self.is_identity:
            return x
        out = np.zeros((*x.shape[:-1], self.action_dim), dtype=x.dtype)
        out[..., self.dim_index] = x
        return out

    def extract(self, x: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., D_r]`` (e.g. a decoded chunk back to the robot's dims)."""
        if x.shape[-1] != self.action_dim:
            raise ValueError(
                f"x: last dim must be the unified action dim {self.action_dim}, "
                f"got {tuple(x.shape)}"
            )
        return x[..., torch.as_tensor(self.dim_index, device=x.device)]

    def to_dict(self) -> dict:
        return {
            "raw_dim": self.raw_dim,
            "action_dim": self.action_dim,
            "dim_index": self.dim_index.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ActionSpaceMap:
        return cls(data["raw_dim"], data["action_dim"], data["dim_index"])
