"""Device-side memory a sampling loop reads and writes: per-step coefficient rows and buffers.

A sampler computes its per-step coefficients once, on the host in float64, when it is
constructed. :class:`StepTables` turns them into ``[B]`` rows on the data's device in
the compute dtype (float64 for float64 data, float32 otherwise) the first time a
(device, dtype, batch) is seen, so that a step does no host arithmetic and launches
no host-to-device copy. :class:`StepBuffers` holds the ``[B, H, D]`` buffers the loop
updates in place; a captured loop keeps one set for its lifetime.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ate_fast.ops.constants import compute_dtype


class StepTables:
    """Per-step ``[B]`` rows: ``tables.<name>[k]`` for every host array given.

    The model times are also kept whole, ``time_blocks[name]`` [K, B] (the rows are its
    views), with ``time_rows`` mapping ``id(row)`` to ``(name, k)``: what a head's step
    features are computed from (:mod:`ate_fast.sampling.step_features`).

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
            block = self._block(np.asarray(values, dtype=np.float64), cd, device, batch)
            setattr(self, name, list(block.unbind(0)))
        self.time_blocks: dict[str, Tensor] = {}
        self.time_rows: dict[int, tuple[str, int]] = {}
        for name, values in model_times.items():
            values = np.asarray(values)
            tdtype = torch.int64 if np.issubdtype(values.dtype, np.integer) else cd
            add_time_table(self, name, self._block(values, tdtype, device, batch))

    @staticmethod
    def _block(values: np.ndarray, dtype: torch.dtype, device: torch.device, batch: int) -> Tensor:
        """The [K, B] table (its rows: contiguous [B] views)."""
        if not np.all(np.isfinite(values)):
            raise AssertionError("ate_fast.sampling: a step coefficient is not finite (bug)")
        full = torch.tensor(values, dtype=dtype).reshape(-1, 1).expand(-1, batch)
        return full.contiguous().to(device)


def add_time_table(tables: Any, name: str, block: Tensor) -> None:
    """Give ``tables`` the model-time table ``name``: its rows ``tables.<name>[k]`` [B]
    (views of ``block`` [K, B]), ``time_blocks[name] = block`` and each row's ``id`` in
    ``time_rows`` — what :class:`~ate_fast.sampling.step_features.StepFeatureCache` reads
    (``StepTables``, and the export's per-graph rows)."""
    rows = list(block.unbind(0))
    setattr(tables, name, rows)
    tables.time_blocks[name] = block
    tables.time_rows.update((id(row), (name, k)) for k, row in enumerate(rows))


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
