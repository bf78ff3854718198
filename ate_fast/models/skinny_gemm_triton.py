"""The Triton kernel of :mod:`ate_fast.models.skinny_gemm`: ``y = x Wᵀ (+ bias) (+ residual)``
for few rows (a π0 step at B = 1: 50), narrow column tiles so that many programs read the
weight at once.

**Status: ran on an H200 (2026-12-04), correct (``test_pi0_shapes_on_cuda``) and slower
than cuBLAS** at every tile (see :mod:`ate_fast.models.skinny_gemm`), so opt-in. It passes
the CPU tests through the Triton interpreter (float64, float32, bfloat16, float16, against
float64) and compiles offline for sm_87 and sm_90 (``tests/triton_offline_compile.py``).

One program per ``[BLOCK_M, BLOCK_N]`` output tile loops over K in ``BLOCK_K`` slices (the
compiler pipelines the loads, ``num_stages`` deep); the bias and the residual are added to
the float32 accumulator before the one rounding, as ``addmm`` with the residual as C does.
Tiles are narrow (``BLOCK_N`` 16–128 columns) because at B = 1 a weight of 1024 output
columns in cuBLAS's 128-wide tiles is read by 8 programs of an H200's 132 SMs; at 32 it is
read by 32, each streaming its ``32 × K`` slice while the rows of x (50 × K, a few hundred
KB) come from L2 to every program.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops.triton_dot import accumulator_type
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_resources import launch_limits

_limits = launch_limits(
    "ATE_FAST_SKINNY_GEMM=triton",
    "Unset ATE_FAST_SKINNY_GEMM (or set it to torch) to run torch's GEMM.",
)

BLOCK_M = 64  # rows per program (the most rows the path takes: skinny_gemm.MAX_ROWS)
K_BYTES = 256  # bytes of K per row and loop step: BLOCK_K = 128 in bf16, 64 in float32
# warps by BLOCK_N: 8 for the wide tiles (float32's FMA dots of a 64 × 64 tile in 4 warps
# spill registers on sm_90)
WARPS_BY_BLOCK_N = {16: 4, 32: 4, 64: 8, 128: 8}
# load stages by BLOCK_N: (BLOCK_M + BLOCK_N) × K_BYTES bytes each, within every target's
# shared memory per block (sm_86 / sm_89: 99 KB; tests/triton_offline_compile.py checks)
STAGES_BY_BLOCK_N = {16: 4, 32: 3, 64: 2, 128: 2}


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, rows, n, k,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
    C: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``y[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias[n]) (+ res[rows, n])``, all row-major
    and contiguous; one program per output tile."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < rows, rn < n
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * k + rk[None, :]
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * k + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), C)
    for k0 in range(0, k, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_rows + k0, mask=m_ok[:, None], other=0.0)
            b = tl.load(w_cols + k0, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < k
            a = tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, C, INTERPRETED)
    ok = m_ok[:, None] & n_ok[None, :]
    out = rm.to(tl.int64)[:, None] * n + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(C)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out, mask=ok, other=0.0).to(C)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)


# the widest column tile by element size: float32 / float64 multiply on FMA units, where a
# 64 × 128 tile spills registers on sm_90 even in 8 warps (tests/triton_offline_compile.py)
WIDEST_BLOCK_N = {2: 128, 4: 64, 8: 64}


def column_tile(block_n: int, dtype: torch.dtype) -> int:
    """The column tile a launch uses: ``block_n``, at most :data:`WIDEST_BLOCK_N`."""
    return min(block_n, WIDEST_BLOCK_N[dtype.itemsize])


def block_k(dtype: torch.dtype) -> int:
    """K per loop step for ``dtype``: :data:`K_BYTES` of each row."""
    return K_BYTES // dtype.itemsize


@_limits
def skinny_gemm(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], block_n: int
) -> Tensor:
    """``x`` [rows, K] · ``weight`` [N, K]ᵀ (+ ``bias`` [N]) (+ ``residual`` [rows, N]) ->
    [rows, N] in x's dtype; every tensor contiguous, on one device, in one dtype (the
    caller, :func:`ate_fast.models.skinny_gemm.skinny_linear`, checks)."""
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    bk, block_n = block_k(x.dtype), column_tile(block_n, x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(rows, BLOCK_M))
    c = accumulator_type(x.dtype)
    _skinny_gemm_kernel[grid](
        x, weight, y if bias is None else bias, y if residual is None else residual, y,
        rows, n, k,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, EVEN_K=k % bk == 0,
        C=c, INTERPRETED=x.device.type == "cpu",
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=bk,
        num_warps=WARPS_BY_BLOCK_N[block_n], num_stages=STAGES_BY_BLOCK_N[block_n],
    )  # fmt: skip
    return y
