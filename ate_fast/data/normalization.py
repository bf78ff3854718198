"""Per-dimension action normalisation (statistics saved with every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_choice

NORMALIZATIONS = ("meanstd", "minmax", "none")

# A dimension whose spread is below this is constant in the data: it is centred but not
# scaled (dividing by ~0 would turn float round-off into huge values).
MIN_SPREAD = 1e-6

ArrayLike = Union[np.ndarray, Tensor]

BLOCK_ELEMENTS = 1 << 20  # float64 temporaries of 8 MB when fitting or normalising


def _row_blocks(x: np.ndarray) -> list[slice]:
    """Row slices of ``x [N, D]`` of about :data:`BLOCK_ELEMENTS` elements each."""
    step = max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


@dataclass
class Normalizer:
    """``meanstd``: ``(a − mean) / std``; ``minmax``: ``2 (a − min) / (max − min) − 1``
    (to [−1, 1]); ``none``: identity. Statistics are per raw action dim, shape ``[D_r]``.
    """

    kind: str
    shift: np.ndarray  # subtracted first: mean, or the midpoint (max + min) / 2
    scale: np.ndarray  # divided by next: std, or the half-range (max − min) / 2
    stats: dict[str, list[float]]  # the raw statistics (mean/std or min/max), for reports
    # "lerobot" when shift/scale follow LeRobot's formulas (with its eps) rather than
    # this class's; they are then saved as they are (see :meth:`from_lerobot_stats`)
    convention: str = "ate_fast"
    # added after scaling (LeRobot's MIN_MAX: (a − min)/(d/2) − 1, exact for constant dims)
    offset: float = 0.0

    @classmethod
    def fit(cls, actions: np.ndarray, kind: str = "meanstd") -> Normalizer:
        """Statistics of ``actions [N, D_r]`` (every frame of every episode, no padding)."""
        check_choice("normalization", kind, tuple(NORMALIZATIONS))
        x = np.asarray(actions)  # not copied to float64: a pre-training set can be GBs
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"actions: expected [N, D] with N > 0, got {tuple(x.shape)}")
        if kind == "meanstd":
            mean = x.mean(0, dtype=np.float64)
            squares = sum(
                np.square(x[rows].astype(np.float64) - mean).sum(0) for rows in _row_blocks(x)
            )
            std = np.sqrt(squares / x.shape[0])
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

    @classmethod
    def from_lerobot_stats(cls, mode: str, stats: dict[str, Any], eps: float = 1e-8) -> Normalizer:
        """LeRobot's action normalisation (``NormalizerProcessorStep``, LeRobot 0.4), exactly.

        ``mode`` is LeRobot's ``NormalizationMode`` value: ``MEAN_STD`` —
        ``(a − mean) / (std + eps)``; ``MIN_MAX`` — ``2 (a − min) / d − 1`` with
        ``d = max − min`` (``eps`` where that is 0); ``QUANTILES`` / ``QUANTILE10`` — the same
        with ``q01``/``q99`` / ``q10``/``q90``; ``IDENTITY``. ``stats`` is the dataset's
        ``meta/stats.json`` entry for the action (lists or arrays of ``[D_r]``).
        """
        keys = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"),
                "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}  # fmt: skip
        if mode == "IDENTITY":
            dim = len(next(iter(stats.values()))) if stats else None
            if dim is None:
                raise ValueError("stats: IDENTITY needs at least one statistic to know the dim")
            return cls("none", np.zeros(dim), np.ones(dim), {}, "lerobot")
        if mode not in keys:
            raise ValueError(
                f"mode must be one of {[*keys, 'IDENTITY']} (LeRobot's NormalizationMode), "
                f"got {mode!r}"
            )
        lo_key, hi_key = keys[mode]
        missing = [k for k in (lo_key, hi_key) if k not in stats]
        if missing:
            raise ValueError(
                f"stats: {mode} needs {lo_key!r} and {hi_key!r}, missing {missing} "
                f"(has {sorted(stats)})"
            )
        lo = np.asarray(stats[lo_key], dtype=np.float64).reshape(-1)
        hi = np.asarray(stats[hi_key], dtype=np.float64).reshape(-1)
        raw = {lo_key: lo.tolist(), hi_key: hi.tolist()}
        if mode == "MEAN_STD":
            return cls("meanstd", lo, hi + eps, raw, "lerobot")
        spread = hi - lo
        spread = np.where(spread == 0, eps, spread)
        return cls("minmax", lo, spread / 2, raw, "lerobot", offset=-1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; :meth:`from_dict` inverts it."""
        data = {"kind": self.kind, "dim": self.dim, "stats": self.stats}
        if self.convention != "ate_fast":
            data.update(
                convention=self.convention,
                shift=self.shift.tolist(),
                scale=self.scale.tolist(),
                offset=self.offset,
            )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        if "shift" in data:  # saved as applied (LeRobot's formulas)
            shift = np.asarray(data["shift"], dtype=np.float64)
            scale = np.asarray(data["scale"], dtype=np.float64)
            convention = data.get("convention", "ate_fast")
            offset = float(data.get("offset", 0.0))
            return cls(data["kind"], shift, scale, data["stats"], convention, offset)
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
            out = (x - shift) / scale
            return out + self.offset if self.offset else out
        if x.ndim != 2:  # [..., D_r]: as rows, in the blocks below
            return self.normalize(x.reshape(-1, self.dim)).reshape(x.shape)
        out = np.empty(x.shape, dtype=x.dtype)
        for rows in _row_blocks(x):  # in float64, a block at a time (no float64 copy of x)
            out[rows] = (x[rows] - self.shift) / self.scale + self.offset
        return out

    def unnormalize(self, x: ArrayLike) -> ArrayLike:
        """Normalised ``[..., D_r]`` → raw units."""
        self._check(x)
        if isinstance(x, Tensor):
            shift = torch.as_tensor(self.shift, dtype=x.dtype, device=x.device)
            scale = torch.as_tensor(self.scale, dtype=x.dtype, device=x.device)
            return (x - self.offset) * scale + shift if self.offset else x * scale + shift
        return ((x - self.offset) * self.scale + self.shift).astype(x.dtype, copy=False)
