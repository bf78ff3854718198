"""The second CUDA streams the package forks work onto: one per purpose and GPU, made on
first use (a sampler's warm-up, before any capture), then reused — inside a captured graph
each fork and join becomes a pair of parallel branches."""

from __future__ import annotations

import torch

_STREAMS: dict[tuple[str, int], torch.cuda.Stream] = {}


def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """The stream for ``purpose`` (e.g. ``"guidance"``, ``"l2_prefetch"``: each its own, so
    that their work can overlap too) on CUDA ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (purpose, index)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device=index)
    return _STREAMS[key]
