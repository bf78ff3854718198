"""The tile product the package's Triton kernels share (imported by the kernel modules only:
importing triton costs a second)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, acc, C: tl.constexpr, INTERPRETED: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in ``C``: operands in their storage dtype (bf16 / fp16
    on tensor cores), float32 and float64 exactly (no TF32). The interpreter multiplies
    bfloat16 as its uint16 bits (Triton 3.x), so there the operands are widened to ``C``
    first: exact, as each bf16 product is in float32; only the summation order differs."""
    if INTERPRETED:
        a, b = a.to(C), b.to(C)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=C)
