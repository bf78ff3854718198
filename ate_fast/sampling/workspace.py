"""Device-side memory a sampling loop reads and writes: per-step coefficient rows and buffers.

A sampler computes its per-step coefficients once, on the host in float64, when it is
constructed. :class:`StepTables` turns them into ``[B]`` rows on the data's device in
the compute dtype (float64 for float64 data, float32 otherwise) the first time a
(device, dtype, batch) is seen, so that a step does no host arithmetic and launches
no host-to-device copy. :class:`StepBuffers` holds the ``[B, H, D]`` buffers the loop
updates in place; a captured loop keeps one set for its lifetime.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.ops.constants import compute_dtype


class StepTables:
    """Per-step ``[B]`` rows: ``tables.<name>[k]`` for every host array given.

    Args:
        host: name -> ``[K]`` float64 array of per-step coefficients.
        model_times: name -> ``[K]`` array of the times passed to the model (int64 for
            diffusion timesteps, float for flow times; floats use the compute dtype).
        device, dtype, batch: where and for what data the rows are built.
    """

    def __init__(
        self,
        host: dict[str, np.ndarray],
        model_times: dict[str, np.ndarray],
        device: torch.device,
        dtype: torch.dtype,
        batch: int,
    ) -> None:
        cd = compute_dtype(dtype)
        for name, values in host.items():
            setattr(self, name, self._rows(np.asarray(values, dtype=np.float64), cd, device, batch))
        for name, values in model_times.items():
            values = np.asarray(values)
            tdtype = torch.int64 if np.issubdtype(values.dtype, np.integer) else cd
            setattr(self, name, self._rows(values, tdtype, device, batch))

    @staticmethod
    def _rows(values: np.ndarray, dtype: torch.dtype, device: torch.device, batch: int) -> list:
        if not np.all(np.isfinite(values)):
            raise AssertionError("ate_fast.sampling: a step coefficient is not finite (bug)")
        full = torch.tensor(values, dtype=dtype).reshape(-1, 1).expand(-1, batch)
        # Rows of a contiguous [K, B] tensor are contiguous [B] views.
        return list(full.contiguous().to(device).unbind(0))


class StepBuffers:
    """Named ``[B, H, D]`` buffers like ``x``, allocated on first use and then reused."""

    def __init__(self, like: Tensor) -> None:
        self._like = like
        self._buffers: dict[str, Tensor] = {}

    def __getitem__(self, name: Union[str, int]) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty(self._like.shape, dtype=self._like.dtype, device=self._like.device)
            self._buffers[name] = buf
        return buf
