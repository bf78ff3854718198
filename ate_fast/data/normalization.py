"""Per-dimension action normalisation (statistics saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

NORMALIZATIONS = ("meanstd", "minmax", "none")

# A dimension whose spread is below this is constant in the data: it is centred but not
# scaled (dividing by ~0 would turn float round-off into huge values).
MIN_SPREAD = 1e-6

ArrayLike = Union[np.ndarray, Tensor]


@dataclass
class Normalizer:
    """``meanstd``: ``(a − mean) / std``; ``minmax``: ``2 (a − min) / (max − min) − 1``
    (to [−1, 1]); ``none``: identity. Statistics are per raw action dim, shape ``[D_r]``.
    """

    kind: str
    shift: np.ndarray  # subtracted first: mean, or the midpoint (max + min) / 2
    scale: np.ndarray  # divided by next: std, or the half-range (max − min) / 2
    stats: dict[str, list[float]]  # the raw statistics (mean/std or min/max), for reports

    @classmethod
    def fit(cls, actions: np.ndarray, kind: str = "meanstd") -> Normalizer:
        """Statistics of ``actions [N, D_r]`` (every frame of every episode, no padding)."""
        if kind not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {kind!r}")
        x = np.asarray(actions, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"actions: expected [N, D] with N > 0, got {tuple(x.shape)}")
        if kind == "meanstd":
            mean, std = x.mean(0), x.std(0)
            return cls.from_stats(kind, {"mean": mean.tolist(), "std": std.tolist()})
        if kind == "minmax":
            lo, hi = x.min(0), x.max(0)
            return cls.from_stats(kind, {"min": lo.tolist(), "max": hi.tolist()})
        return cls.from_stats(kind, {}, dim=x.shape[1])

    @classmethod
    def from_stats(cls, kind: str, stats: dict[str, Any], dim: Optional[int] = None) -> Normalizer:
        """Rebuild from saved statistics (the ``stats`` dict of :meth:`to_dict`);
        ``dim`` is needed only for ``kind="none"``, which has no statistics."""
        if kind == "meanstd":
            shift = np.asarray(stats["mean"], dtype=np.float64)
            scale = np.asarray(stats["std"], dtype=np.float64)
        elif kind == "minmax":
            lo = np.asarray(stats["min"], dtype=np.float64)
            hi = np.asarray(stats["max"], dtype=np.float64)
            shift, scale = (hi + lo) / 2, (hi - lo) / 2
        elif kind == "none":
            if dim is None:
                raise ValueError("dim: required for normalization 'none'")
            shift, scale = np.zeros(dim), np.ones(dim)
        else:
            raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {kind!r}")
        scale = np.where(scale < MIN_SPREAD, 1.0, scale)
        return cls(kind, shift, scale, {k: list(map(float, v)) for k, v in stats.items()})

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` inverts it."""
        return {"kind": self.kind, "dim": self.dim, "stats": self.stats}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        return cls.from_stats(data["kind"], data["stats"], dim=data.get("dim"))

    def _check(self, x: ArrayLike) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"actions: last dim must be the raw action dim {self.dim}, got {tuple(x.shape)}"
            )

    def normalize(self, x: ArrayLike) -> ArrayLike:
        """Raw ``[..., D_r]`` → normalised, same type (numpy or torch) and dtype."""
        self._check(x)
        if isinstance(x, Tensor):
            shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
            scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
            return (x - shift) / scale
        return ((x - self.shift) / self.scale).astype(x.dtype, copy=False)

    def unnormalize(self, x: ArrayLike) -> ArrayLike:
        """Normalised ``[..., D_r]`` → raw units."""
        self._check(x)
        if isinstance(x, Tensor):
            shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
            scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
            return x * scale + shift
        return (x * self.scale + self.shift).astype(x.dtype, copy=False)
