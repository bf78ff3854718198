"""The Triton kernel of :mod:`ate_fast.models.fused_mlp`: a flow-transformer block's whole
gated MLP for few rows in one persistent launch,
``out = x + gelu_tanh(n(x)·W_gateᵀ) · (n(x)·W_upᵀ) · W_downᵀ`` with ``n`` RMSNorm.

**Status: never run on a GPU.** It passes the CPU tests through the Triton interpreter
(float64, float32, bfloat16, float16, against float64) and compiles offline for sm_87 and
sm_90 (``tests/triton_offline_compile.py``).

Why one launch: at B = 1 (50 rows) the MLP is a read of its weights (25 MB of π0's 35 MB per
block in bf16), but torch runs it as three kernels (gate|up GEMM, gated GELU, down GEMM),
each of which starts by waiting for its first weight tiles from HBM with the previous
kernel's tail and its own ramp in between; on an H200 (2026-12-04) those three took
≈ 16 µs per block against 6 µs for the bytes at the copy rate.

How: a grid of about one program per SM takes *tasks* in ticket order (an atomic counter):
first the up tasks, each ``BLOCK_F`` hidden columns over the whole width (gate and up
accumulated side by side; the rows' RMS from the same loads of x), then the down tasks, each
``BLOCK_N`` output columns times one ``SLICE`` of the hidden columns (a partial product
written in the accumulator type). A down task waits (spinning on a counter) until the up
tasks of its slice have stored their hidden columns; the last down task of an output tile
(a second counter) sums the tile's partials in slice order, adds the residual and stores
the one rounding. No task ever waits on a later ticket, and a ticket is only taken by a
running program, so the waits end however many programs run at once — also in the
interpreter, which runs the programs one after another (there, program 0 takes every
ticket). The counters (``sync``, int32, zero on entry) are the caller's: a fresh zeroed
buffer per call (a memset), or inside a captured graph the counters it lends
(:mod:`ate_fast.ops.split_counters`), which the last program done sets back to zero — one
launch per MLP, no memset (never run on a GPU). The sums are in a
fixed order: the result does not depend on the order the tasks ran in. A wait is bounded
(:data:`MAX_POLLS`): a count that never comes makes the output NaN rather than hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.models.block_epilogues_triton import _gelu_tanh
from ate_fast.ops import split_counters, triton_pdl
from ate_fast.ops.triton_dot import accumulator_type
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_pdl import wait as pdl_wait
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits, sm_count

_limits = launch_limits(
    "ATE_FAST_FUSED_MLP=persistent",
    "Unset ATE_FAST_FUSED_MLP (or set it to torch) to run the MLP's three kernels.",
)

INTERPRETER_PROGRAMS = 3  # the interpreter's grid: more than one program, one runs them all
# A down task polls its slice's counter at most this often (each poll an L2 round trip,
# ≈ 1 µs: seconds in all, against microseconds of waiting in a normal launch); past that it
# writes NaN, so that a broken count (or an up task that never ran) shows in the output
# instead of hanging the GPU — and a benchmark run with it
MAX_POLLS = 1 << 22
RESET_BLOCK: tl.constexpr = tl.constexpr(128)  # counters zeroed per store (RESET)


@dataclass(frozen=True)
class LaunchTiles:
    """The kernel's constexpr tiles (see :class:`ate_fast.models.fused_mlp.Tiles` for the
    tunable ones): ``block_k`` / ``block_h`` the K steps of the up and down products."""

    block_m: int
    block_f: int
    block_k: int
    block_n: int
    slice: int
    block_h: int
    warps: int
    stages: int
    programs_per_sm: int


@triton.jit
def _up_task(
    x_ptr, gain_ptr, w_ptr, h_ptr, gu_ptr, act_ptr, ready_ptr, task, rows, width, mlp, eps,
    HAS_GAIN: tl.constexpr, SAVE: tl.constexpr, C: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    SLICE: tl.constexpr,
):  # fmt: skip
    """Hidden columns ``[task·BLOCK_F, +BLOCK_F)`` of every row: ``h = bf(gelu(g)) · u``
    with ``g, u = bf(x·W'ᵀ)·rstd`` (the GEMM's rounding, then RMSNorm's row factor, as the
    unfused Triton path), stored in x's dtype (``SAVE``: also g | u into gu [rows, 2·mlp]
    and gelu(g) into act [rows, mlp], what the input-VJP reads); then one count on its
    slice's counter."""
    rm = tl.arange(0, BLOCK_M)
    cols = task * BLOCK_F + tl.arange(0, BLOCK_F)
    rk = tl.arange(0, BLOCK_K)
    m_ok, f_ok = rm < rows, cols < mlp
    x_rows = x_ptr + rm[:, None] * width + rk[None, :]
    w_gate = w_ptr + cols.to(tl.int64)[None, :] * width + rk[:, None]
    w_up = w_gate + mlp * width
    acc_g = tl.zeros((BLOCK_M, BLOCK_F), C)
    acc_u = tl.zeros((BLOCK_M, BLOCK_F), C)
    squares = tl.zeros((BLOCK_M,), C)
    for k0 in range(0, width, BLOCK_K):
        k_ok = (k0 + rk) < width
        a = tl.load(x_rows + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a_c = a.to(C)
        squares += tl.sum(a_c * a_c, 1)
        if HAS_GAIN:  # RMSNorm's weight on the columns of x (n(x)·Wᵀ = (x·diag(γ))·Wᵀ·rstd)
            gain = tl.load(gain_ptr + k0 + rk, mask=k_ok, other=0.0).to(C)
            a = (a_c * gain[None, :]).to(a.dtype)
        w_ok = k_ok[:, None] & f_ok[None, :]
        acc_g = _dot(a, tl.load(w_gate + k0, mask=w_ok, other=0.0), acc_g, C, INTERPRETED)
        acc_u = _dot(a, tl.load(w_up + k0, mask=w_ok, other=0.0), acc_u, C, INTERPRETED)
    rstd = 1.0 / tl.sqrt(squares / width + eps)
    store_type = h_ptr.dtype.element_ty
    g = acc_g.to(store_type).to(C) * rstd[:, None]
    u = acc_u.to(store_type).to(C) * rstd[:, None]
    act = _gelu_tanh(g).to(store_type)
    ok = m_ok[:, None] & f_ok[None, :]
    at = rm[:, None] * mlp + cols[None, :]
    tl.store(h_ptr + at, (act.to(C) * u).to(store_type), mask=ok)
    if SAVE:
        tl.store(act_ptr + at, act, mask=ok)
        tl.store(gu_ptr + at + rm[:, None] * mlp, g.to(store_type), mask=ok)
        tl.store(gu_ptr + at + (rm[:, None] + 1) * mlp, u.to(store_type), mask=ok)
    tl.debug_barrier()  # every thread's stores before the count that publishes them
    tl.atomic_add(ready_ptr + (task * BLOCK_F) // SLICE, 1, sem="release")


@triton.jit
def _down_task(
    x_ptr, w_ptr, h_ptr, part_ptr, out_ptr, ready_ptr, done_ptr, task, rows, width, mlp,
    C: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, SLICE: tl.constexpr,
    BLOCK_H: tl.constexpr, MAX_POLLS: tl.constexpr,
):  # fmt: skip
    """Output columns ``[i·BLOCK_N, +BLOCK_N)`` times hidden slice ``s`` (task = s·tiles +
    i): waits for the slice's up tasks, writes its partial product; the tile's last task
    sums the partials in slice order, adds the residual and stores the output."""
    tiles = tl.cdiv(width, BLOCK_N)
    slices = tl.cdiv(mlp, SLICE)
    s = task // tiles
    rm = tl.arange(0, BLOCK_M)
    rn = (task % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, BLOCK_H)
    m_ok, n_ok = rm < rows, rn < width
    start = s * SLICE
    stop = tl.minimum(start + SLICE, mlp)
    need = tl.cdiv(stop - start, BLOCK_F)
    count = tl.atomic_add(ready_ptr + s, 0, sem="acquire")
    polls = 0
    # the slice's hidden columns are being written by other programs; a bounded wait (see
    # MAX_POLLS): past it, the partial is NaN, never a hang
    while (count < need) & (polls < MAX_POLLS):
        count = tl.atomic_add(ready_ptr + s, 0, sem="acquire")
        polls += 1
    tl.debug_barrier()
    acc = tl.zeros((BLOCK_M, BLOCK_N), C)
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * mlp + rh[:, None]
    for h0 in range(start, stop, BLOCK_H):
        h_ok = (h0 + rh) < stop
        # written in this launch by other programs: from L2 (.cg), never a stale L1 line
        a = tl.load(h_ptr + rm[:, None] * mlp + (h0 + rh)[None, :],
                    mask=m_ok[:, None] & h_ok[None, :], other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        b = tl.load(w_cols + h0, mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, C, INTERPRETED)
    acc = tl.where(count >= need, acc, float("nan"))
    tile = rm[:, None] * width + rn[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    plane = rows * width
    tl.store(part_ptr + s * plane + tile, acc, mask=ok)
    tl.debug_barrier()
    if tl.atomic_add(done_ptr + task % tiles, 1, sem="acq_rel") == slices - 1:
        total = tl.load(x_ptr + tile, mask=ok, other=0.0).to(C)
        for s2 in range(0, slices):
            total += tl.load(part_ptr + s2 * plane + tile, mask=ok, other=0.0,
                             cache_modifier=".cg")  # fmt: skip
        tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fused_mlp_kernel(
    x_ptr, gain_ptr, w_gu_ptr, w_down_ptr, h_ptr, part_ptr, out_ptr, sync_ptr, gu_ptr,
    act_ptr, rows, width, mlp, eps,
    HAS_GAIN: tl.constexpr, SAVE: tl.constexpr, C: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, SLICE: tl.constexpr, BLOCK_H: tl.constexpr,
    MAX_POLLS: tl.constexpr, RESET: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """x, out [rows, width]; W_gate|up [2·mlp, width]; W_down [width, mlp]; h [rows, mlp];
    part [slices, rows, width] (accumulator type); sync int32 [1 + slices + tiles + 1],
    zero: the ticket, each slice's finished up tasks, each output tile's finished down
    tasks, the programs done; ``SAVE``: gu [rows, 2·mlp], act [rows, mlp] (see
    :func:`_up_task`). ``RESET``: the last program done sets every count back to zero (a
    captured graph's lent counters, :mod:`ate_fast.ops.split_counters`: no memset per
    call). ``PDL``: launched with programmatic dependent launch
    (:mod:`ate_fast.ops.triton_pdl`): nothing touched (counters included) before the wait."""
    if PDL:
        pdl_wait()
    up_tasks = tl.cdiv(mlp, BLOCK_F)
    slices = tl.cdiv(mlp, SLICE)
    total = up_tasks + slices * tl.cdiv(width, BLOCK_N)
    ready_ptr = sync_ptr + 1
    done_ptr = ready_ptr + slices
    task = tl.atomic_add(sync_ptr, 1)
    while task < total:
        if task < up_tasks:
            _up_task(x_ptr, gain_ptr, w_gu_ptr, h_ptr, gu_ptr, act_ptr, ready_ptr, task, rows,
                     width, mlp, eps, HAS_GAIN, SAVE, C, INTERPRETED, BLOCK_M, BLOCK_F, BLOCK_K,
                     SLICE)  # fmt: skip
        else:
            _down_task(x_ptr, w_down_ptr, h_ptr, part_ptr, out_ptr, ready_ptr, done_ptr,
                       task - up_tasks, rows, width, mlp, C, INTERPRETED, BLOCK_M, BLOCK_F,
                       BLOCK_N, SLICE, BLOCK_H, MAX_POLLS)  # fmt: skip
        task = tl.atomic_add(sync_ptr, 1)
    if RESET:  # every program's counting is over once the last one is done
        words = 1 + slices + tl.cdiv(width, BLOCK_N)
        tl.debug_barrier()
        if tl.atomic_add(sync_ptr + words, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            for w0 in range(0, words + 1, RESET_BLOCK):
                at = w0 + tl.arange(0, RESET_BLOCK)
                tl.store(sync_ptr + at, tl.zeros([RESET_BLOCK], tl.int32), mask=at <= words)


def sync_words(width: int, mlp: int, tiles: LaunchTiles) -> int:
    """The int32 counters a launch needs: the ticket, one per hidden slice, one per output
    column tile, the programs done."""
    return 2 + triton.cdiv(mlp, tiles.slice) + triton.cdiv(width, tiles.block_n)


def programs(device: torch.device, tiles: LaunchTiles, tasks: int) -> int:
    """The grid: ``programs_per_sm`` per SM of ``device`` (the interpreter:
    :data:`INTERPRETER_PROGRAMS`), at most one per task."""
    if device.type != "cuda":
        return min(INTERPRETER_PROGRAMS, tasks)
    return min(sm_count(device, INTERPRETER_PROGRAMS) * tiles.programs_per_sm, tasks)


@_limits
def fused_mlp(
    x: Tensor, gain: Optional[Tensor], eps: float, w_gate_up: Tensor, w_down: Tensor,
    out: Tensor, tiles: LaunchTiles, save: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """``(out, gu, act)``: ``out`` [rows, width] ← ``x + gelu_tanh(g)·u·W_downᵀ`` with
    ``g | u = n(x)·W_gate|upᵀ`` (``x`` [rows, width]; ``gain`` [width] RMSNorm's weight or
    None where it is folded into ``w_gate_up`` [2·mlp, width] or absent; ``w_down``
    [width, mlp]); ``save``: also ``gu`` [rows, 2·mlp] (g | u as the MLP used them) and
    ``act`` [rows, mlp] (gelu_tanh(g)), else None. Every tensor contiguous, one dtype, one
    device (the caller, :mod:`ate_fast.models.fused_mlp`, checks). ``out`` may be ``x``."""
    rows, width = x.shape
    mlp = w_down.shape[1]
    slices = triton.cdiv(mlp, tiles.slice)
    c = accumulator_type(x.dtype)
    part_dtype = torch.float64 if c == tl.float64 else torch.float32
    h = torch.empty((rows, mlp), dtype=x.dtype, device=x.device)
    part = torch.empty((slices, rows, width), dtype=part_dtype, device=x.device)
    words = sync_words(width, mlp, tiles)
    sync = split_counters.for_launch(x.device, words)  # zero, left zero (in a capture)
    reset = sync is not None
    if sync is None:
        sync = torch.zeros(words, dtype=torch.int32, device=x.device)
    gu = act = None
    if save:
        gu = torch.empty((rows, 2 * mlp), dtype=x.dtype, device=x.device)
        act = torch.empty_like(h)
    tasks = triton.cdiv(mlp, tiles.block_f) + slices * triton.cdiv(width, tiles.block_n)
    _fused_mlp_kernel[(programs(x.device, tiles, tasks),)](
        x, x if gain is None else gain, w_gate_up, w_down, h, part, out, sync,
        h if gu is None else gu, h if act is None else act, rows, width, mlp, eps,
        HAS_GAIN=gain is not None, SAVE=save, C=c, INTERPRETED=x.device.type == "cpu",
        BLOCK_M=tiles.block_m, BLOCK_F=tiles.block_f, BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n, SLICE=tiles.slice, BLOCK_H=tiles.block_h, MAX_POLLS=MAX_POLLS,
        RESET=reset, num_warps=tiles.warps, num_stages=tiles.stages,
        **triton_pdl.launch_kwargs(x.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return out, gu, act
