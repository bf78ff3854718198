"""Counters for kernels that sum their split work themselves, lent by a captured graph.

A kernel that cuts each output tile's work into slices over several programs can sum the
slices in-kernel instead of in a second kernel: every program stores its partial and counts
itself in (one atomic per tile); the program that counts last sums the tile's partials in
slice order (for the few-row GEMM the sum kernel's order, so the same result to the bit)
and resets the count to zero. So the counters must start at zero and no kernel running at the same
time may share them. A captured sampler (:mod:`ate_fast.sampling.capture`) owns one buffer,
zeroed before its warm-up, and lends it (:func:`lend`) to the kernels launched on its
capture stream: those run one after another (a launch with programmatic dependent launch
touches the counters only after its wait, when the one before has ended), and each leaves
the buffer zero for the next, also from one replay to the next (a graph never runs
concurrently with itself). Anywhere else — eager calls, another stream (a side stream's
branch of the same graph) — :func:`for_launch` is None and the kernels launch their
separate sum; and everywhere with ``ATE_FAST_SPLIT_REDUCE=kernel`` (default ``auto``: in
the kernel where counters are lent). The kernels that use them: the few-row GEMM's K
slices (:mod:`ate_fast.models.skinny_gemm_triton`), the split-key attention's key slices
(:mod:`ate_fast.models.split_kv_attention_triton`) and the persistent MLP's task counts
(:mod:`ate_fast.models.fused_mlp_triton`: its last program done zeroes them, so no memset).
Triton-free: the capture imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Optional

import torch
from torch import Tensor

from ate_fast.argument_checks import env_choice

ENV_VAR = "ATE_FAST_SPLIT_REDUCE"
CHOICES = ("auto", "kernel")
CAPACITY = 1 << 14  # counters per buffer (64 KB): output tiles of one launch at most
_LENT: ContextVar[Optional[tuple[Tensor, Optional[torch.cuda.Stream]]]] = ContextVar(
    "ate_fast_split_counters", default=None
)


def new_buffer(device: torch.device) -> Tensor:
    """A zeroed buffer of :data:`CAPACITY` int32 counters on ``device`` [CAPACITY] (make it
    outside a capture: a capture would record the zeroing, not run it)."""
    return torch.zeros(CAPACITY, dtype=torch.int32, device=device)


@contextlib.contextmanager
def lend(counters: Tensor) -> Iterator[None]:
    """Within the block, kernels launched on the stream current now (on ``counters``'s
    device; on the CPU, every launch) may use ``counters`` [CAPACITY], int32, all zero."""
    device = counters.device
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    token = _LENT.set((counters, stream))
    try:
        yield
    finally:
        _LENT.reset(token)


def in_kernel() -> bool:
    """``$ATE_FAST_SPLIT_REDUCE``: ``auto`` (also where unset) — split work reduced by each
    tile's last program where counters are lent; ``kernel`` — always by a second kernel."""
    return env_choice(ENV_VAR, CHOICES) == "auto"


def for_launch(device: torch.device, needed: int) -> Optional[Tensor]:
    """The lent counters for a launch on ``device`` that counts ``needed`` tiles, or None:
    none lent, ``ATE_FAST_SPLIT_REDUCE=kernel``, another device, too few, or (CUDA) another
    stream than the lender's."""
    lent = _LENT.get()
    if lent is None or not in_kernel():
        return None
    counters, stream = lent
    if counters.device != device or needed > counters.numel():
        return None
    if stream is not None and torch.cuda.current_stream(device) != stream:
        return None
    return counters
