"""The Triton kernel of :mod:`ate_fast.models.l2_prefetch`: read tensors once, into the
GPU's L2 cache (``ld.global.cg``: cached in L2, not in L1), writing nothing but one word per
program. The lines then age in L2 like any other: PTX's L2 eviction priority needs a cache
policy operand Triton does not expose, and its ``evict_last`` (an L1 hint) cannot be
combined with ``.cg`` (ptxas refuses it: ``tests/triton_offline_compile.py`` found that).

Each program reads ``BLOCK`` 32-bit words of one tensor's bytes and stores their XOR into a
per-program sink, so that the loads have a use the compiler cannot remove; the sink is
never read. On the CPU it runs through Triton's interpreter (the tests check the words'
XORs, i.e. that every word was read). An XOR, not a sum: a sum of words wraps, which the
compiled code does but the interpreters of Triton 3.6 – 3.8 refuse (int32 overflow).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits

_limits = launch_limits("ATE_FAST_L2_PREFETCH", "Unset ATE_FAST_L2_PREFETCH to prefetch nothing.")

BLOCK = 4096  # 32-bit words per program: 16 KB, whole 128-byte lines


@triton.jit
def _prefetch_kernel(words_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(words_ptr + offs, mask=offs < n, other=0, cache_modifier=".cg")
    tl.store(sink_ptr + pid, tl.xor_sum(w, axis=0))


def words(t: Tensor) -> Tensor:
    """``t``'s bytes as 32-bit words (a view; ``t`` contiguous, its size a multiple of 4
    bytes: :func:`~ate_fast.models.l2_prefetch.prefetchable`)."""
    return t.reshape(-1).view(torch.int32)


@_limits
def prefetch(tensors: list[Tensor], sink: Tensor) -> None:
    """One launch per tensor: every word read into L2; ``sink`` (int32, at least
    :func:`sink_size` words) gets each program's XOR of its words, tensor after tensor."""
    at = 0
    for t in tensors:
        w = words(t)
        grid = triton.cdiv(w.numel(), BLOCK)
        _prefetch_kernel[(grid,)](
            w, sink[at:], w.numel(), BLOCK=BLOCK, num_warps=4, **COMPILE_OPTIONS
        )
        at += grid


def sink_size(tensors: list[Tensor]) -> int:
    """Words of sink :func:`prefetch` writes for ``tensors``."""
    return sum(triton.cdiv(t.numel() * t.element_size() // 4, BLOCK) for t in tensors)
