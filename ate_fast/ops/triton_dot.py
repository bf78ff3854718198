"""The tile product and accumulator type the package's Triton kernels share (imported by the
kernel modules only: importing triton costs a second)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ate_fast.ops.constants import compute_dtype


def accumulator_type(dtype: torch.dtype) -> tl.dtype:
    """The Triton type of :func:`~ate_fast.ops.constants.compute_dtype` for data stored in
    ``dtype`` (a kernel's ``C``): float64 for float64, else float32."""
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def tile_dot(a, b, acc, C: tl.constexpr, INTERPRETED: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in ``C``: operands in their storage dtype (bf16 / fp16
    on tensor cores), float32 and float64 exactly (no TF32). The interpreter multiplies
    bfloat16 as its uint16 bits (Triton 3.x), so there the operands are widened to ``C``
    first: exact, as each bf16 product is in float32; only the summation order differs."""
    if INTERPRETED:
        a, b = a.to(C), b.to(C)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=C)
