"""Triton kernel of the guided step (CUDA, or the CPU through ``TRITON_INTERPRET=1``).

float32, float16 and bfloat16 data, computed in float32 (Triton passes Python floats as
float32, so float64 data is left to the other backends).

Imported only when the triton backend is selected: importing triton costs a second.
The interpreter reads ``TRITON_INTERPRET`` when a kernel is decorated, so the variable
must be set before this module is first imported.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops.triton_resources import COMPILE_OPTIONS, OTHER_BACKEND, launch_limits

_BLOCK = 1024


@triton.jit
def _guided_step_kernel(
    out_ptr, x_ptr, m_ptr, g_ptr, mp_ptr, z_ptr,
    a_ptr, b_ptr, c_ptr, d_ptr, s_ptr,
    row, blocks_per_row, scale, clamp,
    HAS_X: tl.constexpr, HAS_G: tl.constexpr, HAS_P: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per (batch row, block of that row): the [B] coefficients are scalars.
    pid = tl.program_id(0)
    r = pid // blocks_per_row
    offs = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row
    idx = r.to(tl.int64) * row + offs
    cdt = tl.float32
    m = tl.load(m_ptr + idx, mask=mask).to(cdt)
    corrected = m
    if HAS_G:
        g = tl.load(g_ptr + idx, mask=mask).to(cdt)
        u = tl.load(c_ptr + r) * g
        # where-chains keep NaN like torch.clamp (minimum/maximum may drop it)
        u = tl.where(u < -clamp, -clamp, tl.where(u > clamp, clamp, u))
        corrected = m + scale * u
    acc = tl.load(b_ptr + r) * corrected
    if HAS_X:
        acc = tl.load(a_ptr + r) * tl.load(x_ptr + idx, mask=mask).to(cdt) + acc
    if HAS_P:
        acc = acc + tl.load(d_ptr + r) * tl.load(mp_ptr + idx, mask=mask).to(cdt)
    if HAS_Z:
        acc = acc + tl.load(s_ptr + r) * tl.load(z_ptr + idx, mask=mask).to(cdt)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@launch_limits("guided_step's triton backend", OTHER_BACKEND)
def guided_step_triton_into(
    out: Tensor,
    x: Optional[Tensor],
    m: Tensor,
    a: Optional[Tensor],
    b: Tensor,
    g: Optional[Tensor],
    c: Optional[Tensor],
    m_prev: Optional[Tensor],
    d: Optional[Tensor],
    z: Optional[Tensor],
    s: Optional[Tensor],
    scale: float,
    clamp: float,
) -> None:
    """Write the guided step into ``out`` [B, ...]; inputs validated by the caller."""
    batch = m.shape[0]
    row = m.numel() // batch if batch else 0
    if m.numel() == 0:
        return
    blocks_per_row = triton.cdiv(row, _BLOCK)
    # Absent tensors are never read (constexpr flags); m / b stand in for their pointers.
    _guided_step_kernel[(batch * blocks_per_row,)](
        out, m if x is None else x, m, m if g is None else g,
        m if m_prev is None else m_prev, m if z is None else z,
        b if a is None else a, b, b if c is None else c, b if d is None else d,
        b if s is None else s,
        row, blocks_per_row, float(scale), float(clamp),
        HAS_X=x is not None, HAS_G=g is not None, HAS_P=m_prev is not None,
        HAS_Z=z is not None, BLOCK=_BLOCK, **COMPILE_OPTIONS,
    )  # fmt: skip
