"""The Triton kernels of :mod:`ate_fast.models.split_kv_attention`: attention of a few
hundred query rows against a long key/value sequence, the keys split over many programs
(flash-decoding), then one combine.

**Status: the first form ran on an H200 (2026-12-04), correct (``test_pi0_step_on_cuda``)
and not faster than SDPA in the captured call** (see the module that selects it): its
partial kernel took 10.2 µs per block and its combine 10.7 µs — a loop over the 14 slices,
one dependent load after another. **This form has not run on a GPU yet**: the combine loads
all slices of a row at once, one slice needs no partials and no combine, and the tiles are
a :class:`Tiles` argument, so that ``benchmarks/bench_prefix_attention.py`` can time many
against SDPA's backends in one run. It passes the CPU tests through the Triton interpreter
(float64, float32, bfloat16 against ``F.scaled_dot_product_attention``, several tiles) and
compiles offline for sm_87 and sm_90 (``tests/triton_offline_compile.py``).

Why: in π0's step at B = 1 attention is 400 query rows (50 tokens × 8 heads folded onto the
one key/value head) against 866 keys of 256 dims. The SDPA kernel torch picks on an H200
(cuDNN's flash forward, 64 × 128 tiles of queries × keys) runs it on 7 programs, one per 64
query rows, each reading all 0.9 MB of keys and values: 24.5 µs per block, 38 % of the step's
kernel time (2026-12-04). Here every (block of queries, slice of keys) pair is a program:

* :func:`_partial_kernel` — per program ``block_q`` queries against its slice of keys, in
  ``block_k`` chunks with the online softmax; writes its un-normalised output and its rows'
  running max and sum (float32) — or, with one slice, the normalised output itself;
* :func:`_combine_kernel` — per row, the slices' outputs weighted by ``exp(m_s − M)`` and
  divided by the weighted sums: the softmax over all keys. Inside a captured graph (which
  lends the counters, :mod:`ate_fast.ops.split_counters`; ``ATE_FAST_SPLIT_REDUCE``) the
  query block's last partial program combines its rows instead — one launch fewer per
  block; the two sum the slices in different orders (agreeing to rounding, not the bit).

With ``ATE_FAST_TRITON_PDL=on`` (Hopper and later, :mod:`ate_fast.ops.triton_pdl`) both, and
split_sdpa's :func:`_combine_lse_kernel`, are launched with programmatic dependent launch
and wait before they read: with the few-row GEMM and the epilogues on Triton, a block's
every kernel then starts while the one before it ends. **Not run on a GPU yet.**
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.models.split_kv_attention import Tiles
from ate_fast.ops import split_counters, triton_pdl
from ate_fast.ops.constants import compute_dtype
from ate_fast.ops.triton_dot import accumulator_type
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_pdl import wait as pdl_wait
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits, sm_count

_limits = launch_limits(
    "ATE_FAST_PREFIX_ATTENTION=split_kv",
    "Unset ATE_FAST_PREFIX_ATTENTION (or set it to sdpa) to run torch's attention.",
)


def num_warps(block_d: int) -> int:
    """Warps per program: 8 for head dims above 128 (float32's FMA dots over 256 dims spill
    registers in 4 warps on sm_90), else 4."""
    return 8 if block_d > 128 else 4


def default_tiles(dtype: torch.dtype, head_dim: int) -> Tiles:
    """The tiles the launcher uses unless given others: bf16 / fp16 on tensor cores in 32 ×
    32 tiles with two stages (within the 99 KB of shared memory of sm_86 / sm_89 at 256
    dims); float32 / float64 (FMA dots) smaller, so that no tile spills registers
    (tests/triton_offline_compile.py). The keys split until the grid has one program per
    SM. ``benchmarks/bench_prefix_attention.py`` times these against other tiles and SDPA."""
    warps = num_warps(max(16, triton.next_power_of_2(head_dim)))
    if dtype.itemsize == 2:
        return Tiles(32, 32, warps=warps, stages=2)
    return Tiles(16, 32 if dtype.itemsize == 4 else 16, warps=warps)


INTERPRETER_SMS = 8  # the SM count the interpreter's grid is sized by


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, y_ptr, count_ptr, rows, keys, heads, per_split,
    splits, scale, q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, v_sb, v_sh, v_sr,
    HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    C: tl.constexpr, SINGLE: tl.constexpr, COMBINE: tl.constexpr, INTERPRETED: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Program (query block, key slice, sample × head): its queries' softmax-weighted sum of
    the slice's values. ``SINGLE`` (one slice): normalised, into ``y`` [B·heads, rows, HD]
    in the output's dtype; else un-normalised into ``o`` [B·heads, rows, splits, HD] and the
    rows' max / sum of exp into ``m``, ``l`` [B·heads, rows, splits] (the compute type),
    which :func:`_combine_kernel` combines — or (``COMBINE``) the query block's last
    program does, in slice order, counted in ``count_ptr`` (int32, one per query block and
    sample × head, zero on entry and left zero: :mod:`ate_fast.ops.split_counters`).
    ``PDL``: launched with programmatic dependent launch (:mod:`ate_fast.ops.triton_pdl`);
    nothing is read before the wait (the keys' action rows are the previous kernel's)."""
    if PDL:
        pdl_wait()
    split, bh = tl.program_id(1), tl.program_id(2)
    b, h = (bh // heads).to(tl.int64), (bh % heads).to(tl.int64)
    iq = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    q_ok, d_ok = iq < rows, d < HD
    q = tl.load(q_ptr + b * q_sb + h * q_sh + iq.to(tl.int64)[:, None] * q_sr + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    m = tl.full([BLOCK_Q], float("-inf"), C)
    l_sum = tl.zeros([BLOCK_Q], C)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], C)
    start = split * per_split
    end = tl.minimum(start + per_split, keys)
    for k0 in range(start, end, BLOCK_K):  # every slice has at least one key
        ik = k0 + tl.arange(0, BLOCK_K)
        kv_ok = (ik < end)[:, None] & d_ok[None, :]
        rows_k = ik.to(tl.int64)[:, None]
        k = tl.load(k_ptr + b * k_sb + h * k_sh + rows_k * k_sr + d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), None, C, INTERPRETED) * scale
        s = tl.where((ik < end)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + rows_k * v_sr + d[None, :], mask=kv_ok, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], C, INTERPRETED)
        m = m_new
    ok = q_ok[:, None] & d_ok[None, :]
    if SINGLE:
        out = (acc / l_sum[:, None]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + (bh * rows + iq.to(tl.int64))[:, None] * HD + d[None, :], out, mask=ok)
    else:
        first = (bh * rows + iq.to(tl.int64)) * splits  # each row's slice 0
        row = first + split
        tl.store(o_ptr + row[:, None] * HD + d[None, :], acc, mask=ok)
        tl.store(m_ptr + row, m, mask=q_ok)
        tl.store(l_ptr + row, l_sum, mask=q_ok)
        if COMBINE:
            tl.debug_barrier()  # every thread's stores before the count that publishes them
            block = count_ptr + bh * tl.num_programs(0) + tl.program_id(0)
            if tl.atomic_add(block, 1, sem="acq_rel") == splits - 1:  # the last slice in
                _combine_rows(o_ptr, m_ptr, l_ptr, y_ptr, first, bh * rows + iq.to(tl.int64),
                              splits, q_ok, d, d_ok, HD, BLOCK_Q, BLOCK_D, C)  # fmt: skip
                tl.atomic_xchg(block, 0)  # zero again for the next launch


@triton.jit
def _combine_rows(
    o_ptr, m_ptr, l_ptr, y_ptr, first, out_row, splits, q_ok, d, d_ok,
    HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """The rows ``out_row`` [BLOCK_Q] of ``y`` from their slices (slice 0 of each at
    ``first``): outputs weighted by ``exp(m_s − M)`` over ``Σ_s exp(m_s − M)·l_s``, one slice
    after another (read past L1: other programs wrote them)."""
    top = tl.full([BLOCK_Q], float("-inf"), C)
    for s in range(0, splits):
        top = tl.maximum(top, tl.load(m_ptr + first + s, mask=q_ok, other=0.0,
                                      cache_modifier=".cg"))  # fmt: skip
    num = tl.zeros([BLOCK_Q, BLOCK_D], C)
    den = tl.zeros([BLOCK_Q], C)
    ok = q_ok[:, None] & d_ok[None, :]
    for s in range(0, splits):
        w = tl.exp(tl.load(m_ptr + first + s, mask=q_ok, other=0.0, cache_modifier=".cg") - top)
        den += w * tl.load(l_ptr + first + s, mask=q_ok, other=1.0, cache_modifier=".cg")
        o = tl.load(o_ptr + (first + s)[:, None] * HD + d[None, :], mask=ok, other=0.0,
                    cache_modifier=".cg")  # fmt: skip
        num += w[:, None] * o
    y = num / den[:, None]
    tl.store(y_ptr + out_row[:, None] * HD + d[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_kernel(
    o_ptr, m_ptr, l_ptr, y_ptr, splits,
    HD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per row of [B·heads·rows]: its slices' outputs (one load, all slices)
    weighted by ``exp(m_s − M)`` over the weighted sums ``Σ_s exp(m_s − M)·l_s``, into ``y``
    [B·heads·rows, HD] (the output's dtype); ``SPLITS``: ``splits`` to a power of two.
    ``PDL``: as :func:`_partial_kernel`'s."""
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    s_ok, d_ok = s < splits, d < HD
    at = row * splits + s
    m = tl.load(m_ptr + at, mask=s_ok, other=float("-inf"))
    w = tl.exp(m - tl.max(m, axis=0))  # 0 on the padding slices
    total = tl.sum(w * tl.load(l_ptr + at, mask=s_ok, other=0.0), axis=0)
    ok = s_ok[:, None] & d_ok[None, :]
    o = tl.load(o_ptr + at[:, None] * HD + d[None, :], mask=ok, other=0.0)
    y = tl.sum(w[:, None] * o, axis=0) / total
    tl.store(y_ptr + row * HD + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _combine_lse_kernel(
    o1_ptr, l1_ptr, o2_ptr, l2_ptr, y_ptr, rows, kv_heads, chunks,
    o1_sb, o1_sh, o1_sr, l1_sb, l1_sh, l1_sr, o2_sb, o2_sh, o2_sr, l2_sb, l2_sh, l2_sr,
    HD: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr, REST: tl.constexpr,
    C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per row of y [B, kv_heads, rows, HD] (contiguous): the normalised
    outputs of ``chunks`` key chunks, ``o1`` [B, kv_heads·chunks, rows, HD] with their
    log-sum-exps ``l1`` [B, kv_heads·chunks, rows] (kv head h's chunks at heads
    h·chunks …), and with ``REST`` one more, ``o2`` [B, kv_heads, rows, HD] / ``l2``,
    weighted by ``exp(l − max l)``: the softmax over all the keys, in ``C`` (float32;
    float64 for float64 data). Any strides. ``PDL``: as :func:`_partial_kernel`'s (its
    predecessors, ATen's flash kernels, never let it start early: the wait costs nothing)."""
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    b, h, i = row // (kv_heads * rows), (row // rows) % kv_heads, row % rows
    s = tl.arange(0, CHUNKS)
    d = tl.arange(0, BLOCK_D)
    s_ok, d_ok = s < chunks, d < HD
    head = h * chunks + s
    lse = tl.load(l1_ptr + b * l1_sb + head * l1_sh + i * l1_sr, mask=s_ok, other=float("-inf"))
    lse = lse.to(C)
    top = tl.max(lse, axis=0)
    if REST:
        rest = tl.load(l2_ptr + b * l2_sb + h * l2_sh + i * l2_sr).to(C)
        top = tl.maximum(top, rest)
    w = tl.exp(lse - top)  # 0 on the padding chunks
    o = tl.load(o1_ptr + b * o1_sb + head[:, None] * o1_sh + i * o1_sr + d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    num = tl.sum(w[:, None] * o.to(C), axis=0)
    den = tl.sum(w, axis=0)
    if REST:
        w2 = tl.exp(rest - top)
        o2 = tl.load(o2_ptr + b * o2_sb + h * o2_sh + i * o2_sr + d, mask=d_ok, other=0.0)
        num += w2 * o2.to(C)
        den += w2
    tl.store(y_ptr + row * HD + d, (num / den).to(y_ptr.dtype.element_ty), mask=d_ok)


@_limits
def combine_lse(
    o1: Tensor, l1: Tensor, rest: Optional[tuple[Tensor, Tensor]], chunks: int
) -> Tensor:
    """:func:`_combine_lse_kernel`'s launcher: ``y`` [B, kv_heads, rows, hd] (contiguous,
    o1's dtype) from ``o1`` [B, kv_heads·chunks, rows, hd] and ``l1`` [B, kv_heads·chunks,
    rows] (the chunks' normalised outputs and log-sum-exps) and ``rest`` = ``(o2, l2)`` for
    the last, shorter chunk ([B, kv_heads, rows, hd], [B, kv_heads, rows]) or None."""
    batch, heads, rows, hd = o1.shape
    kv_heads = heads // chunks
    y = torch.empty((batch, kv_heads, rows, hd), dtype=o1.dtype, device=o1.device)
    o2, l2 = rest if rest is not None else (o1, l1)  # unread without REST
    _combine_lse_kernel[(batch * kv_heads * rows,)](
        o1, l1, o2, l2, y, rows, kv_heads, chunks,
        o1.stride(0), o1.stride(1), o1.stride(2), l1.stride(0), l1.stride(1), l1.stride(2),
        o2.stride(0), o2.stride(1), o2.stride(2), l2.stride(0), l2.stride(1), l2.stride(2),
        HD=hd, CHUNKS=triton.next_power_of_2(chunks), BLOCK_D=max(16, triton.next_power_of_2(hd)),
        REST=rest is not None, C=accumulator_type(o1.dtype), num_warps=4,
        **triton_pdl.launch_kwargs(o1.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return y


def key_slices(rows: int, keys: int, programs: int, tiles: Tiles, sms: int) -> int:
    """Keys per slice: whole ``block_k`` chunks, ``tiles.splits`` slices (at most one per
    chunk) or, for 0, as few keys per slice as fill ``tiles.programs_per_sm`` × ``sms``
    programs with ``programs`` (samples × heads) × query blocks."""
    chunks = triton.cdiv(keys, tiles.block_k)
    if tiles.splits:
        splits = min(chunks, tiles.splits)
    else:
        grid = programs * triton.cdiv(rows, tiles.block_q)
        splits = min(chunks, max(1, triton.cdiv(tiles.programs_per_sm * sms, grid)))
    return tiles.block_k * triton.cdiv(chunks, splits)


@_limits
def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, tiles: Optional[Tiles] = None) -> Tensor:
    """``softmax(q kᵀ/√hd) v``: ``q`` [B, heads, rows, hd], ``k``, ``v`` [B, heads, keys, hd]
    (any batch / head / row strides, unit last stride; one dtype) -> [B, heads, rows, hd]
    contiguous, in q's dtype. ``tiles``: :func:`default_tiles` unless given."""
    batch, heads, rows, hd = q.shape
    keys = k.shape[2]
    tiles = tiles or default_tiles(q.dtype, hd)
    block_d = max(16, triton.next_power_of_2(hd))
    per_split = key_slices(rows, keys, batch * heads, tiles, sm_count(q.device, INTERPRETER_SMS))
    splits = triton.cdiv(keys, per_split)
    torch_c, c = compute_dtype(q.dtype), accumulator_type(q.dtype)
    pdl = triton_pdl.launch_kwargs(q.device)  # the PDL constexpr and its launch keyword
    y = torch.empty((batch, heads, rows, hd), dtype=q.dtype, device=q.device)
    o = m = l_sum = y  # unused by the one-slice kernel
    grid = (triton.cdiv(rows, tiles.block_q), splits, batch * heads)
    counts = None
    if splits > 1:
        o = torch.empty((batch * heads, rows, splits, hd), dtype=torch_c, device=q.device)
        m = torch.empty((batch * heads, rows, splits), dtype=torch_c, device=q.device)
        l_sum = torch.empty_like(m)
        counts = split_counters.for_launch(q.device, grid[0] * grid[2])
    _partial_kernel[grid](
        q, k, v, o, m, l_sum, y, y if counts is None else counts, rows, keys, heads, per_split,
        splits, hd**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        HD=hd, BLOCK_Q=tiles.block_q, BLOCK_K=tiles.block_k, BLOCK_D=block_d, C=c,
        SINGLE=splits == 1, COMBINE=counts is not None, INTERPRETED=q.device.type == "cpu",
        num_warps=tiles.warps, num_stages=tiles.stages, **pdl, **COMPILE_OPTIONS,
    )  # fmt: skip
    if splits > 1 and counts is None:
        _combine_kernel[(batch * heads * rows,)](
            o, m, l_sum, y, splits, HD=hd, SPLITS=triton.next_power_of_2(splits),
            BLOCK_D=block_d, num_warps=4, **pdl, **COMPILE_OPTIONS,
        )  # fmt: skip
    return y
