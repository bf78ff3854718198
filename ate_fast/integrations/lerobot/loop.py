"""One sampling loop behind a patched LeRobot policy: eager, or captured per shape."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import Tensor

from ate_fast.guidance import Guidance
from ate_fast.sampling import CapturedSampler, DiffusionSampler, FlowSampler
from ate_fast.sampling.inputs import tensor_leaves

# captures kept per patched policy (one per batch size / device / dtype / cond layout)
MAX_CAPTURES = 8


class SamplingLoop:
    """``loop(noise [B, H, D], cond, generator) -> actions [B, H, D]``.

    ``capture=False`` runs ``sampler.sample`` each call. ``capture=True`` captures the
    loop once per (batch, device, dtype, cond shapes) — a CUDA graph on GPU, recorded
    fused steps on the CPU — and replays it; calls with a ``generator`` (LeRobot passes
    none) run eagerly, since a capture binds its generator. The returned actions are a
    fresh tensor either way (LeRobot's action queue keeps views of them).
    """

    def __init__(
        self,
        sampler: DiffusionSampler | FlowSampler,
        guidance: Optional[Guidance] = None,
        capture: bool = False,
    ) -> None:
        self.sampler = sampler
        self.guidance = guidance
        self.capture = capture
        self.captures: OrderedDict[tuple, CapturedSampler] = OrderedDict()

    def __call__(
        self, noise: Tensor, cond: Any, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        if not self.capture or generator is not None:
            return self.sampler.sample(noise, cond, self.guidance, generator)
        key = _shape_key(noise, cond)
        captured = self.captures.get(key)
        if captured is None:
            captured = self.sampler.capture(noise, cond, self.guidance)
            self.captures[key] = captured
            if len(self.captures) > MAX_CAPTURES:
                self.captures.popitem(last=False)
        else:
            self.captures.move_to_end(key)
        return captured(noise, cond).clone()


def _shape_key(noise: Tensor, cond: Any) -> tuple:
    leaves = tuple((path, tuple(t.shape), t.dtype, t.device) for path, t in tensor_leaves(cond))
    return (tuple(noise.shape), noise.dtype, noise.device, leaves)
