"""Memory overlap between a fused op's destination and its inputs.

The fused kernels read and write flat arrays element by element (the guided step) or
read their inputs in full before writing (the MLP guidance). A destination that *is* an
input (same first element; shapes, dtypes and contiguity are validated, so the whole
tensor coincides) is safe for an element-wise op and is what the samplers rely on to
update in place. A destination that shares only part of its memory with an input would
be read after being written: the ops then compute into a temporary and copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from torch import Tensor

__all__ = ["byte_range", "overlaps", "overlaps_any", "partially_overlaps_any"]


def byte_range(t: Tensor) -> tuple[int, int]:
    """``[start, end)`` address range a tensor's elements span (empty for numel 0)."""
    if t.numel() == 0:
        return 0, 0
    size = t.element_size()
    start = end = t.data_ptr()
    for n, stride in zip(t.shape, t.stride()):
        reach = (n - 1) * stride * size
        if reach < 0:
            start += reach
        else:
            end += reach
    return start, end + size


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the address ranges of ``a`` and ``b`` intersect (conservative for strided
    tensors: interleaved views count as overlapping)."""
    a0, a1 = byte_range(a)
    b0, b1 = byte_range(b)
    return a0 < b1 and b0 < a1 and a0 != a1 and b0 != b1


def partially_overlaps_any(out: Tensor, inputs: Iterable[Optional[Tensor]]) -> bool:
    """True if ``out`` overlaps an input without being exactly that input (same first
    element, strides, shape and dtype: element i of ``out`` is element i of the input).

    Called on every fused step, so the common case is a few integer comparisons: the
    tensors are validated contiguous, so each spans ``[data_ptr, data_ptr + nbytes)``.
    """
    o0 = out.data_ptr()
    o1 = o0 + out.nbytes
    for t in inputs:
        if t is None or t is out:
            continue
        t0 = t.data_ptr()
        if t0 < o1 and o0 < t0 + t.nbytes and not (
            t0 == o0 and t.stride() == out.stride() and t.shape == out.shape
            and t.dtype == out.dtype
        ):  # fmt: skip
            if overlaps(out, t):  # exact ranges (also right for strided tensors)
                return True
    return False


def overlaps_any(out: Tensor, inputs: Iterable[Optional[Tensor]]) -> bool:
    """True if ``out`` shares memory with any input, exact aliases included (for ops that
    read their inputs in full while writing). Same fast path as
    :func:`partially_overlaps_any`."""
    o0 = out.data_ptr()
    o1 = o0 + out.nbytes
    for t in inputs:
        if t is None:
            continue
        t0 = t.data_ptr()
        if t0 < o1 and o0 < t0 + t.nbytes and overlaps(out, t):
            return True
    return False
