"""Training-time real-time chunking's sampler option: the committed prefix, written into
the sample at every step (Black, Ren, Equi, Levine, arXiv 2512.05964).

A policy trained with :mod:`ate_fast.realtime.training` saw, for a delay d, chunks whose
first d actions were clean (``x_t[:, :d] = a0[:, :d]``). At inference the first d actions
of the new chunk are the ones already committed (executed while it was computed), Y[:, :d];
:class:`PrefixInpainting` writes them into the sample before every model evaluation and
after every step of ``FlowSampler`` (its ``inpainting=`` option), so the model sees what
it was trained on and the returned chunk starts with exactly Y[:, :d]. No VJP, no extra
model evaluation: the cost is one masked copy per step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_int
from ate_fast.errors import InvalidArgumentError
from ate_fast.realtime.prefix_buffers import Delay, check_chunk, write_prefix


def prefix_mask_table(horizon: int, max_delay: int) -> np.ndarray:
    """``[max_delay + 1, H]`` bool: row d is True on the first d positions."""
    return np.arange(horizon)[None, :] < np.arange(max_delay + 1)[:, None]


class PrefixInpainting:
    """Writes the committed prefix ``Y[:, :d]`` into the sample (implements
    :class:`ate_fast.sampling.Inpainting`; ``FlowSampler.sample/capture(...,
    inpainting=...)``).

    Args:
        prev_chunk: Y [B, H, D], aligned so that ``Y[:, i]`` is the action committed for the
            new chunk's step i (as :class:`~ate_fast.realtime.RTCGuidance`'s), or None (call
            :meth:`set_prefix` before sampling).
        delay: d, an int or one int per sample, each in ``0..max_delay``.
        max_delay: the largest delay this object will be given (≤ H); the mask table has
            one row per delay, so one capture serves every d ≤ max_delay.

    Y and the mask [B, H, 1] live in static buffers that :meth:`set_prefix` overwrites in
    place (no host sync, but for B different delays on a GPU), keeping the first Y's shape,
    dtype and device.
    """

    def __init__(
        self, prev_chunk: Optional[Tensor] = None, delay: Delay = 0, *, max_delay: int
    ) -> None:
        self._max_delay = check_int("max_delay", max_delay, 0, 1 << 20)
        self.prev_chunk: Optional[Tensor] = None  # Y [B, H, D], static
        self.mask: Optional[Tensor] = None  # [B, H, 1] bool, static: True on the prefix
        self._table: Optional[Tensor] = None  # [max_delay + 1, H] bool
        self._out: Optional[Tensor] = None  # [B, H, D] scratch of apply_
        if prev_chunk is not None:
            self.set_prefix(prev_chunk, delay)

    max_delay = property(lambda self: self._max_delay, doc="The largest delay accepted.")

    def __repr__(self) -> str:
        shape = None if self.prev_chunk is None else tuple(self.prev_chunk.shape)
        return f"PrefixInpainting(prev_chunk={shape}, max_delay={self._max_delay})"

    def set_prefix(self, prev_chunk: Tensor, delay: Delay = 0, *, check_finite: bool = True):
        """Write Y = ``prev_chunk`` [B, H, D] and the mask of ``delay`` into the buffers."""
        prev_chunk = check_chunk(prev_chunk, check_finite)
        fresh = self.prev_chunk is None
        if fresh:
            self._allocate(prev_chunk)
        y, mask, table = self.prev_chunk, self.mask, self._table
        assert y is not None and mask is not None and table is not None
        why = f" (max_delay = {self._max_delay})"
        try:
            write_prefix("PrefixInpainting", prev_chunk, delay, y, mask, table, why)
        except Exception:
            if fresh:  # not armed with an empty mask: sampling then says there is no prefix
                self.prev_chunk = self.mask = self._table = self._out = None
            raise

    def clear_prefix(self) -> None:
        """Empty the mask (delay 0 everywhere): the sampler's output is then unchanged."""
        if self.mask is None:
            raise InvalidArgumentError("clear_prefix() needs a prefix: call set_prefix() first")
        self.mask.zero_()

    def _allocate(self, prev_chunk: Tensor) -> None:
        horizon = prev_chunk.shape[1]
        if self._max_delay > horizon:
            raise InvalidArgumentError(
                f"max_delay must be <= H = {horizon} (prev_chunk's horizon), got {self._max_delay}"
            )
        device = prev_chunk.device
        # plain tensors even when first set under torch.inference_mode(): the buffers are
        # written in place on every later tick, which an inference tensor forbids outside it
        with torch.inference_mode(False):
            self._table = torch.tensor(prefix_mask_table(horizon, self._max_delay), device=device)
            self.prev_chunk = torch.zeros_like(prev_chunk, memory_format=torch.contiguous_format)
            self.mask = torch.zeros(
                prev_chunk.shape[0], horizon, 1, dtype=torch.bool, device=device
            )
            self._out = torch.empty_like(self.prev_chunk)

    # -- the Inpainting protocol -------------------------------------------------------
    def check(self, noise: Tensor) -> None:
        """Raise unless Y is set and shaped, typed and placed like ``noise`` [B, H, D]."""
        y = self.prev_chunk
        if y is None:
            raise InvalidArgumentError(
                "PrefixInpainting has no prefix: call set_prefix(prev_chunk, delay) before "
                "sampling (clear_prefix() for a chunk with nothing committed)"
            )
        if noise.shape != y.shape or noise.dtype != y.dtype or noise.device != y.device:
            raise InvalidArgumentError(
                f"noise must match prev_chunk: shape {tuple(y.shape)}, {y.dtype} on {y.device}; "
                f"got {tuple(noise.shape)}, {noise.dtype} on {noise.device}"
            )

    def apply_(self, x: Tensor) -> None:
        """``x[b, i] = Y[b, i]`` where the mask is set (i < d_b), in place; exact."""
        y, mask, out = self.prev_chunk, self.mask, self._out
        if y is None or mask is None or out is None:
            raise InvalidArgumentError("PrefixInpainting.apply_ needs set_prefix() first")
        torch.where(mask, y, x, out=out)
        x.copy_(out)
