"""The Triton kernels of :mod:`ate_fast.models.skinny_gemm`: ``y = x Wᵀ (+ bias) (+ residual)``
for few rows (a π0 step at B = 1: 50), narrow column tiles and K split in slices, so that
many programs read the weight at once.

**Status:** without the K split the kernel ran on an H200 (2026-12-04), correct
(``test_pi0_shapes_on_cuda``) and slower than cuBLAS at every tile (see
:mod:`ate_fast.models.skinny_gemm`), so it is opt-in. **The K split (and its sum kernel)
has never run on a GPU.** Both pass the CPU tests through the Triton interpreter (float64,
float32, bfloat16, float16, against float64) and compile offline for sm_87 and sm_90
(``tests/triton_offline_compile.py``).

One program per ``[BLOCK_M, BLOCK_N]`` output tile and slice of K loops over its slice in
``BLOCK_K`` steps (the compiler pipelines the loads, ``num_stages`` deep). Unsplit, the
bias and the residual are added to the float32 accumulator before the one rounding, as
``addmm`` with the residual as C does; split, each slice stores its float partial product
to a workspace and the slices are added in order, then the bias and the residual, and
rounded once: by :func:`_split_sum_kernel`, or — inside a captured graph, which lends the
counters (:mod:`ate_fast.ops.split_counters`) — by each tile's last program (the
kernel's ``SUM``: one launch fewer per split GEMM, 54 per π0 step; never run on a GPU).

Tiles are narrow (``BLOCK_N`` 16–128 columns) because at B = 1 a weight of 1024 output
columns in cuBLAS's 128-wide tiles is read by 8 programs of an H200's 132 SMs; at 32 it is
read by 32, each streaming its ``32 × K`` slice while the rows of x (50 × K, a few hundred
KB) come from L2 to every program — and 32 programs are still a quarter of the SMs, hence
the split (:func:`k_splits`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops import split_counters, triton_pdl
from ate_fast.ops.constants import compute_dtype
from ate_fast.ops.triton_activations import NONE, activation_epilogue
from ate_fast.ops.triton_dot import accumulator_type
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_pdl import prefetch_l2 as pdl_prefetch
from ate_fast.ops.triton_pdl import wait as pdl_wait
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits, sm_count

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
# Split K where the column tiles leave SMs idle: o and down at 32 columns are 32 programs
# for an H200's 132 SMs, each streaming a 32-column strip of the whole weight alone
PROGRAMS_PER_SM = 2  # the auto split's aim: every SM with loads from two programs
MIN_STEPS_PER_SLICE = 2  # K steps per slice at least (one step: nothing to pipeline)
INTERPRETER_SMS = 4  # the auto split's SM count on the CPU (it splits small tests too)
SUM_BLOCK = 1024  # outputs per program of the slices' sum
LINE_BYTES = 128  # an L2 cache line: one prefetch per line of a weight row


@triton.jit
def _epilogue(acc, bias_ptr, res_ptr, pre_ptr, y_ptr, rn, n_ok, out, ok,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
              ACT_GRAD: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """``y[out] = act(acc (+ bias[rn])) (+ res[out])``, rounded once to y's dtype; the
    activation's input saved to ``pre[out]`` — or, ``ACT_GRAD``, ``acc ⊙ act'(pre[out])``
    (:func:`~ate_fast.ops.triton_activations.activation_epilogue`)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(C)[None, :]
    acc = activation_epilogue(acc, pre_ptr, out, ok, ACT, ACT_GRAD)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out, mask=ok, other=0.0).to(C)
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, pre_ptr, y_ptr, out_ptr, count_ptr, rows, n, k,
    k_per_split, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    ACT_GRAD: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr, SUM: tl.constexpr, C: tl.constexpr, INTERPRETED: tl.constexpr,
    PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LINE: tl.constexpr, W_KN: tl.constexpr,
):  # fmt: skip
    """``y[rows, n] = act(x[rows, k] · w[n, k]ᵀ (+ bias[n])) (+ res[rows, n])``, all
    row-major and contiguous — or, ``W_KN``, ``x · w`` for ``w[k, n]`` (a layer's input-VJP
    through its weight); ``ACT`` an activation code (``NONE``: none) whose input goes to
    ``pre[rows, n]`` (compute type), or with ``ACT_GRAD`` the product times ``act'(pre)``
    (the activation's input-VJP) instead (:func:`_epilogue`).

    One program per output tile and slice of K (program id 2: ``k_per_split`` of K, a
    multiple of ``BLOCK_K``). ``SPLIT``: ``y`` is the float workspace
    ``[splits, rows, n]`` in ``C``, each slice's partial product stored unrounded; then
    either :func:`_split_sum_kernel` adds them up, or (``SUM``) the tile's last program
    does — counted in ``count_ptr`` (int32, one per tile, zero on entry and left zero:
    :mod:`ate_fast.ops.split_counters`) — in slice order, as that kernel, with the
    epilogue, into ``out``; else the whole K and the epilogue into ``y``. ``PDL``
    (launched with programmatic dependent launch): the program's weight strip goes to L2
    (one prefetch per ``LINE`` elements of a row) while the kernel before still runs, and
    nothing else is touched before :func:`~ate_fast.ops.triton_pdl.wait`."""
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < rows, rn < n
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k)
    if PDL:  # the weights are constant: read them before the previous kernel ends
        if W_KN:  # the tile's columns of each row of w: at most a line or two per row
            first = w_ptr + tl.program_id(0) * BLOCK_N
            for k0 in range(k_lo, k_hi, BLOCK_K):
                pdl_prefetch(first + tl.minimum(k0 + rk, k - 1).to(tl.int64) * n)
        else:
            strip = tl.minimum(rn, n - 1).to(tl.int64)[:, None] * k  # in bounds, as the loads
            lines = tl.arange(0, BLOCK_K // LINE)[None, :] * LINE
            for k0 in range(k_lo, k_hi, BLOCK_K):
                pdl_prefetch(w_ptr + strip + tl.minimum(k0 + lines, k - 1))
        pdl_wait()
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * k + rk[None, :]
    if W_KN:
        w_cols = w_ptr + rk.to(tl.int64)[:, None] * n + rn[None, :]
        w_step = n
    else:
        w_cols = w_ptr + rn.to(tl.int64)[None, :] * k + rk[:, None]
        w_step = 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), C)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_rows + k0, mask=m_ok[:, None], other=0.0)
            b = tl.load(w_cols + k0 * w_step, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + rk) < k  # only K's last step is short: slices start on a step
            a = tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + k0 * w_step, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, C, INTERPRETED)
    ok = m_ok[:, None] & n_ok[None, :]
    out = rm.to(tl.int64)[:, None] * n + rn[None, :]
    if SPLIT:
        plane = tl.cast(rows, tl.int64) * n
        tl.store(y_ptr + tl.program_id(2) * plane + out, acc, mask=ok)
        if SUM:
            tl.debug_barrier()  # every thread's stores before the count that publishes them
            tile = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            splits = tl.num_programs(2)
            if tl.atomic_add(tile, 1, sem="acq_rel") == splits - 1:  # the last slice in
                total = tl.zeros((BLOCK_M, BLOCK_N), C)
                for s in range(0, splits):  # in order: the sum kernel's sum, to the bit
                    total += tl.load(y_ptr + s * plane + out, mask=ok, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                _epilogue(total, bias_ptr, res_ptr, pre_ptr, out_ptr, rn, n_ok, out, ok,
                          HAS_BIAS, HAS_RESIDUAL, ACT, ACT_GRAD, C)  # fmt: skip
                tl.atomic_xchg(tile, 0)  # zero again for the next launch
    else:
        _epilogue(acc, bias_ptr, res_ptr, pre_ptr, y_ptr, rn, n_ok, out, ok,
                  HAS_BIAS, HAS_RESIDUAL, ACT, ACT_GRAD, C)  # fmt: skip


@triton.jit
def _split_sum_kernel(
    ws_ptr, bias_ptr, res_ptr, pre_ptr, y_ptr, size, n, splits,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    ACT_GRAD: tl.constexpr, C: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``y = act(Σ_s ws[s] (+ bias)) (+ res)`` over ``size`` = rows · n outputs, the slices
    in order (the result does not depend on which program finished first), rounded once;
    the activation as :func:`_epilogue`'s."""
    if PDL:
        pdl_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    acc = tl.zeros((BLOCK,), C)
    for s in range(splits):
        acc += tl.load(ws_ptr + s * size + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % n, mask=ok, other=0.0).to(C)
    acc = activation_epilogue(acc, pre_ptr, offs, ok, ACT, ACT_GRAD)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs, mask=ok, other=0.0).to(C)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# the widest column tile by element size: float32 / float64 multiply on FMA units, where a
# 64 × 128 tile spills registers on sm_90 even in 8 warps (tests/triton_offline_compile.py)
WIDEST_BLOCK_N = {2: 128, 4: 64, 8: 64}


# ... and for the weight read as stored [K, N] (float32's split 64-column tile spills)
WIDEST_BLOCK_N_KN = {2: 128, 4: 32, 8: 64}


def column_tile(block_n: int, dtype: torch.dtype, weight_kn: bool = False) -> int:
    """The column tile a launch uses: ``block_n``, at most :data:`WIDEST_BLOCK_N` (or, for
    the weight read as stored, :data:`WIDEST_BLOCK_N_KN`)."""
    widest = WIDEST_BLOCK_N_KN if weight_kn else WIDEST_BLOCK_N
    return min(block_n, widest[dtype.itemsize])


def line_elements(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` per 128-byte cache line (one L2 prefetch each)."""
    return LINE_BYTES // dtype.itemsize


def block_k(dtype: torch.dtype) -> int:
    """K per loop step for ``dtype``: :data:`K_BYTES` of each row."""
    return K_BYTES // dtype.itemsize


def k_splits(n_tiles: int, k: int, bk: int, requested: Optional[int], sms: int) -> tuple[int, int]:
    """``(splits, k_per_split)`` for ``n_tiles`` column tiles over K = ``k`` in steps of
    ``bk``: ``requested`` slices (at most one per step), or where None, one slice while the
    tiles fill the SMs, else enough for :data:`PROGRAMS_PER_SM` programs per SM with at
    least :data:`MIN_STEPS_PER_SLICE` steps each (a slice's loads still pipeline). Slices
    are whole steps and equal but the last, so ``splits`` may come out below the count
    asked for."""
    steps = triton.cdiv(k, bk)
    if requested is None:
        wanted = 1 if n_tiles >= sms else triton.cdiv(PROGRAMS_PER_SM * sms, n_tiles)
        wanted = min(wanted, max(steps // MIN_STEPS_PER_SLICE, 1))
    else:
        wanted = min(requested, steps)
    per_slice = triton.cdiv(steps, wanted)
    return triton.cdiv(steps, per_slice), per_slice * bk


@_limits
def skinny_gemm(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    block_n: int,
    split_k: Optional[int] = None,
    weight_kn: bool = False,
    activation: int = NONE,
    pre: Optional[Tensor] = None,
    activation_grad: bool = False,
) -> Tensor:
    """``x`` [rows, K] · ``weight`` [N, K]ᵀ (+ ``bias`` [N]) (+ ``residual`` [rows, N]) ->
    [rows, N] in x's dtype — or, ``weight_kn``, ``x · weight`` for ``weight`` [K, N];
    every tensor contiguous, on one device, in one dtype (the callers,
    :mod:`ate_fast.models.skinny_gemm`, check). ``activation`` (a code of
    :mod:`ate_fast.ops.triton_activations`) applied before the residual is added, its
    input written to ``pre`` [rows, N] (contiguous, the compute dtype) — or, with
    ``activation_grad``, the product times ``act'(pre)`` instead (the input-VJP through
    the activation at the forward's ``pre``). ``split_k``: K's
    slices (:func:`k_splits`; None: by the SM count); with more than one, the partial
    products go to a float workspace [splits, rows, N], summed by each tile's last program
    where counters are lent (:func:`ate_fast.ops.split_counters.for_launch`: inside a
    captured graph), else by a second kernel — the same sums to the bit.
    ``$ATE_FAST_TRITON_PDL=on``: both kernels launched with programmatic dependent launch
    (:func:`ate_fast.ops.triton_pdl.for_device`: raises where the GPU or Triton has none)."""
    rows, k = x.shape
    n = weight.shape[1 if weight_kn else 0]
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    bk, block_n = block_k(x.dtype), column_tile(block_n, x.dtype, weight_kn)
    n_tiles = triton.cdiv(n, block_n)
    splits, k_per_split = k_splits(n_tiles, k, bk, split_k, sm_count(x.device, INTERPRETER_SMS))
    c = accumulator_type(x.dtype)
    pdl = triton_pdl.launch_kwargs(x.device)  # the PDL constexpr and its launch keyword
    ws = counts = None
    grid = (n_tiles, triton.cdiv(rows, BLOCK_M), splits)
    if splits > 1:
        ws = torch.empty((splits, rows, n), dtype=compute_dtype(x.dtype), device=x.device)
        counts = split_counters.for_launch(x.device, grid[0] * grid[1])
    # a split with a separate sum: that kernel adds bias and residual and activates (one
    # compiled variant of the GEMM)
    epilogue = splits == 1 or counts is not None
    act = activation if epilogue else NONE
    _skinny_gemm_kernel[grid](
        x, weight, y if bias is None else bias, y if residual is None else residual,
        y if pre is None else pre, y if ws is None else ws, y, y if counts is None else counts,
        rows, n, k, k_per_split,
        HAS_BIAS=epilogue and bias is not None, HAS_RESIDUAL=epilogue and residual is not None,
        ACT=act, ACT_GRAD=activation_grad and act != NONE, EVEN_K=k % bk == 0,
        SPLIT=splits > 1, SUM=counts is not None, C=c,
        INTERPRETED=x.device.type == "cpu",
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=bk, LINE=line_elements(x.dtype),
        W_KN=weight_kn, num_warps=WARPS_BY_BLOCK_N[block_n],
        num_stages=STAGES_BY_BLOCK_N[block_n], **pdl, **COMPILE_OPTIONS,
    )  # fmt: skip
    if ws is not None and counts is None:
        _split_sum_kernel[(triton.cdiv(rows * n, SUM_BLOCK),)](
            ws, y if bias is None else bias, y if residual is None else residual,
            y if pre is None else pre, y, rows * n, n, splits,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACT=activation,
            ACT_GRAD=activation_grad and activation != NONE, C=c,
            BLOCK=SUM_BLOCK, num_warps=4, **pdl, **COMPILE_OPTIONS,
        )  # fmt: skip
    return y
