"""Random draws that consume a generator exactly as diffusers' ``randn_tensor`` does.

diffusers draws each step's noise with ``torch.randn(shape, generator=g, dtype=data
dtype)`` on the generator's device (a CPU generator with CUDA data draws on the CPU
and copies). Drawing into a preallocated buffer with ``out=`` gives the same numbers
from the same generator state, so a captured loop allocates nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class NoiseDraw:
    """Draws ``[B, H, D]`` standard normal noise into ``out`` like diffusers.

    Args:
        out: the buffer the sampler reads the draw from (data dtype and device).
        generator: a ``torch.Generator`` or None (the global RNG of ``out``'s device).
    """

    def __init__(self, out: Tensor, generator: Optional[torch.Generator]) -> None:
        self.out = out
        self.generator = generator
        staged = generator is not None and torch.device(generator.device).type != out.device.type
        # A CPU generator feeding device data draws on the CPU first (diffusers' rule).
        self._stage = torch.empty(out.shape, dtype=out.dtype) if staged else None

    def __call__(self) -> Tensor:
        if self._stage is None:
            torch.randn(self.out.shape, generator=self.generator, out=self.out)
        else:
            torch.randn(self._stage.shape, generator=self.generator, out=self._stage)
            self.out.copy_(self._stage)
        return self.out
