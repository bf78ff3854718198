"""Triton kernels of the Transformer encoder's forward and input-VJP (the ``triton`` path of
:mod:`ate_fast.steer.transformer_vjp`; CUDA, or the CPU through ``TRITON_INTERPRET=1``).

**Status: CUDA's default for a batch of one since their H200 run (2026-12-04).** They
pass the CPU tests through the Triton interpreter (float64, float32, bfloat16, float16),
compile offline for sm_87 and sm_90 within the shared memory of each and of sm_86 / sm_89
(``tests/triton_offline_compile.py``, the same four storage dtypes), and ran on an H200
(``bench_transformer_guidance.py``, graphed, checked against autograd): 1.58× faster than
the hand-written VJP in bf16 at B = 1, 1.03× in float32; slower at B = 8 and 64 (float32),
where the VJP stays the default (:data:`ate_fast.steer.transformer_vjp.SINGLE_SAMPLE_PATH`).

Five kernels, each replacing a chain of torch kernels of one post-norm layer (each takes
``ATE_FAST_TRITON_PDL``: with ``ATE_FAST_SKINNY_GEMM=triton`` at B = 1 the layer's
projections are Triton kernels too, and every kernel of a layer a programmatic dependent
launch — not run on a GPU yet):

* :func:`add_norm` — residual add + LayerNorm forward, one program per token row (the
  row, ``d_model ≤ 4096``, in one block); stores the output, the pre-norm sum (what the
  backward reads) and the row's mean and 1/std.
* :func:`norm_backward` — LayerNorm's input-VJP, with up to one extra incoming gradient
  added first (the residual branch's, or a skip connection's): ``dx = LN'(dy + dy2)``.
* :func:`bias_act` / :func:`act_backward` — bias + GELU (exact, erf) or ReLU forward from
  a bias-free matmul, storing the pre-activation; and ``g ⊙ act'(pre)``; element-wise.
* :func:`attention` — ``softmax(QKᵀ/√hd)V`` for every head of every sample, one program
  per (sample, head, block of queries), looping over blocks of 16 keys (online softmax);
  reads Q, K, V straight from the in-projection's output (no head split copies), writes
  the heads merged ``[B, Tq, d]`` and the softmax's log-sum-exp per query (the backward
  recomputes P from it).
* :func:`attention_backward` — ``dQ, dK, dV`` in one kernel per layer: per (sample, head)
  one program per block of keys (dK, dV, looping over the queries) and one per block of
  queries (dQ, looping over the keys); ``rowsum(P ⊙ dP)`` as ``rowsum(dO ⊙ O)`` from the
  saved output; no atomics (each gradient row is summed in one program, in a fixed order);
  written into caller-given views (the merged ``[B, T, 3d]`` gradient of the
  in-projection's output, so that one matmul takes it back to the layer input).

Storage float32, float64, float16 or bfloat16; arithmetic in float32 (float64 for float64
data: the saved statistics' dtype, chosen by the launchers, is the compute type). The
attention's dots take their operands in the storage dtype — bfloat16 / float16 on tensor
cores, P and dS rounded to it first as FlashAttention does, accumulated in float32 — and
float32 / float64 exactly (``input_precision="ieee"``, no TF32); ``out_dtype`` explicit
(Triton < 3.7 defaults it to float32, which float64 fails to compile). Tiles are small
(≤ 32 queries × 16 keys, :data:`TILES`) so that registers and shared memory stay within
every target's limits at any token count: ``tests/triton_offline_compile.py`` checks each
variant's shared memory against the GPU's per-block limit and that the attention kernels
spill no registers in bf16, fp16 and float32 (ptxas).

Imported only when the ``triton`` path runs (importing triton costs a second); the
interpreter reads ``TRITON_INTERPRET`` when a kernel is decorated.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.ops import triton_pdl
from ate_fast.ops.constants import compute_dtype
from ate_fast.ops.triton_activations import GELU, RELU, activation, times_activation_grad
from ate_fast.ops.triton_dot import tile_dot as _dot
from ate_fast.ops.triton_pdl import wait as pdl_wait
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits

_limits = launch_limits(
    "ATE_FAST_TRANSFORMER_GUIDANCE=triton",
    "Unset ATE_FAST_TRANSFORMER_GUIDANCE (or set it to vjp) to run the hand-written VJP on "
    "torch ops.",
)

# (queries, keys) per tile of the attention kernels, by pass and element size: bf16 / fp16
# 32 × 16 (tensor-core dots), float32 / float64 16 × 16 (FMA dots, twice or four times the
# registers per element) — so that no tile spills registers or outgrows the smallest
# target's shared memory (sm_89: 99 KB) at any token count (tests/triton_offline_compile.py
# checks both). A table per pass, so that bench_transformer_guidance.py can time other bf16
# tiles (CANDIDATE_TILES) by replacing an entry
TILES = {
    "forward": {2: (32, 16), 4: (16, 16), 8: (16, 16)},
    "backward": {2: (32, 16), 4: (16, 16), 8: (16, 16)},
}
# bf16 / fp16 tiles timed against TILES (bench_transformer_guidance.py's rows
# triton_<name>_graph), each replacing some passes' entries — every key of a 52-token layer
# in one chunk — and compiled offline like TILES (tests/triton_offline_compile.py)
CANDIDATE_TILES = {
    "f64x64": {"forward": (64, 64)},
    "f64x64_b32x64": {"forward": (64, 64), "backward": (32, 64)},
}
MAX_ROW = 4096  # LayerNorm row width in one block
ACT_BLOCK = 1024  # elements per program of the element-wise kernels
ACT_GELU = GELU  # the activation codes (ate_fast.ops.triton_activations)
ACT_RELU = RELU


def _block(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def attention_warps(block_t: int, block_d: int) -> int:
    """Warps per attention program: 8 once a ``[T, hd]`` tile holds 16×128 elements."""
    return 8 if block_t * block_d >= 16 * 128 else 4


# ---------------------------------------------------------------- LayerNorm rows
@triton.jit
def _strided_row_sum(
    a_ptr, a_sb, a_st, b_ptr, b_sb, b_st, row, rows_per_batch, cols, ok,
    HAS_B: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    # Row ``row`` of a [B, T, n] tensor with strides (a_sb, a_st, 1), plus b's when HAS_B,
    # in the compute type C (the add + norm forward's x + r; its backward's dy + dy2).
    bi, ti = row // rows_per_batch, row % rows_per_batch
    out = tl.load(a_ptr + bi * a_sb + ti * a_st + cols, mask=ok, other=0.0).to(C)
    if HAS_B:
        out = out + tl.load(b_ptr + bi * b_sb + ti * b_st + cols, mask=ok, other=0.0).to(C)
    return out


@triton.jit
def _add_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr,
    rows_per_batch, x_sb, x_st, r_sb, r_st, n, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # One program per token row: s = x + r, y = (s − mean)·rstd·w + b. PDL (every kernel
    # here): launched with programmatic dependent launch, nothing read before the wait.
    if PDL:
        pdl_wait()
    C: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    s = _strided_row_sum(
        x_ptr, x_sb, x_st, r_ptr, r_sb, r_st, row, rows_per_batch, cols, ok, HAS_RES, C
    )
    tl.store(s_ptr + row * n + cols, s.to(s_ptr.dtype.element_ty), mask=ok)
    mean = tl.sum(s, 0) / n
    xc = tl.where(ok, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(C)
    b = tl.load(b_ptr + cols, mask=ok, other=0.0).to(C)
    tl.store(y_ptr + row * n + cols, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward_kernel(
    dy_ptr, dy2_ptr, s_ptr, mean_ptr, rstd_ptr, w_ptr, dx_ptr,
    rows_per_batch, dy_sb, dy_st, dy2_sb, dy2_st, n,
    HAS_DY2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # One program per row: g = dy (+ dy2); dx = rstd·(w⊙g − mean(w⊙g) − x̂·mean(w⊙g⊙x̂)).
    if PDL:
        pdl_wait()
    C: tl.constexpr = mean_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    g = _strided_row_sum(
        dy_ptr, dy_sb, dy_st, dy2_ptr, dy2_sb, dy2_st, row, rows_per_batch, cols, ok, HAS_DY2, C
    )
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    s = tl.load(s_ptr + row * n + cols, mask=ok, other=0.0).to(C)
    xhat = tl.where(ok, (s - mean) * rstd, 0.0)
    wg = g * tl.load(w_ptr + cols, mask=ok, other=0.0).to(C)
    c1 = tl.sum(wg, 0) / n
    c2 = tl.sum(wg * xhat, 0) / n
    dx = rstd * (wg - c1 - xhat * c2)
    tl.store(dx_ptr + row * n + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _rows(t: Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a ``[B, T, n]`` tensor with unit column stride."""
    if t.stride(-1) != 1:
        raise ValueError("expected a unit stride along the last dimension")
    return t.stride(0), t.stride(1)


@_limits
def add_norm(
    x: Tensor, residual: Optional[Tensor], norm: torch.nn.LayerNorm
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``LayerNorm(x + residual)`` (or of ``x`` alone) for ``x``, ``residual`` [B, T, n]
    (any batch and row strides, unit column stride) -> ``(y [B, T, n], (s, mean, rstd))``:
    ``s = x + residual`` [B, T, n] contiguous, ``mean``/``rstd`` [B·T] in the compute type."""
    batch, rows, n = x.shape
    y = torch.empty((batch, rows, n), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y)
    stats = torch.empty((2, batch * rows), dtype=compute_dtype(x.dtype), device=x.device)
    if y.numel():
        r = x if residual is None else residual
        _add_norm_kernel[(batch * rows,)](
            x, r, norm.weight, norm.bias, y, s, stats[0], stats[1], rows, *_rows(x), *_rows(r),
            n, float(norm.eps), HAS_RES=residual is not None, BLOCK=_block(n),
            **triton_pdl.launch_kwargs(x.device), **COMPILE_OPTIONS,
        )  # fmt: skip
    return y, (s, stats[0], stats[1])


@_limits
def norm_backward(
    grad: Tensor, extra: Optional[Tensor], saved: tuple[Tensor, Tensor, Tensor], weight: Tensor
) -> Tensor:
    """LayerNorm's input-VJP of ``grad (+ extra)`` ([B, T, n], any batch and row strides)
    with ``saved`` from :func:`add_norm` -> ``dx`` [B, T, n] (the gradient of ``s``, so
    also of both summands of a residual add)."""
    s, mean, rstd = saved
    batch, rows, n = grad.shape
    dx = torch.empty((batch, rows, n), dtype=grad.dtype, device=grad.device)
    if dx.numel():
        e = grad if extra is None else extra
        _norm_backward_kernel[(batch * rows,)](
            grad, e, s, mean, rstd, weight, dx, rows, *_rows(grad), *_rows(e), n,
            HAS_DY2=extra is not None, BLOCK=_block(n), **triton_pdl.launch_kwargs(grad.device),
            **COMPILE_OPTIONS,
        )  # fmt: skip
    return dx


# ---------------------------------------------------------------- bias + activation
@triton.jit
def _bias_act_kernel(
    x_ptr, b_ptr, pre_ptr, y_ptr, numel, width,
    ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # pre = x + b (b broadcast along rows, pre kept in the compute type), y = act(pre).
    if PDL:
        pdl_wait()
    C: tl.constexpr = pre_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    pre = tl.load(x_ptr + offs, mask=ok, other=0.0).to(C)
    pre = pre + tl.load(b_ptr + offs % width, mask=ok, other=0.0).to(C)
    y = activation(pre, ACT)
    tl.store(pre_ptr + offs, pre, mask=ok)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _act_backward_kernel(
    g_ptr, pre_ptr, dx_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    # dx = g ⊙ act'(pre); element-wise, in pre's (the compute) type.
    if PDL:
        pdl_wait()
    C: tl.constexpr = pre_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    u = tl.load(pre_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(C)
    d = times_activation_grad(g, u, ACT)
    tl.store(dx_ptr + offs, d.to(dx_ptr.dtype.element_ty), mask=ok)


@_limits
def bias_act(x: Tensor, bias: Tensor, act: int) -> tuple[Tensor, Tensor]:
    """``(pre, act(pre))`` with ``pre = x + bias`` for contiguous ``x`` [..., n] and
    ``bias`` [n]; ``act`` :data:`ACT_GELU` (exact) or :data:`ACT_RELU`. ``pre`` is in the
    compute type (what :func:`act_backward` reads), ``act(pre)`` in ``x``'s."""
    pre = torch.empty(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
    y = torch.empty_like(x)
    if x.numel():
        _bias_act_kernel[(triton.cdiv(x.numel(), ACT_BLOCK),)](
            x,
            bias,
            pre,
            y,
            x.numel(),
            x.shape[-1],
            ACT=act,
            BLOCK=ACT_BLOCK,
            **triton_pdl.launch_kwargs(x.device),
            **COMPILE_OPTIONS,
        )
    return pre, y


@_limits
def act_backward(grad: Tensor, pre: Tensor, act: int) -> Tensor:
    """``grad ⊙ act'(pre)`` [...] for contiguous ``grad`` and ``pre`` (from
    :func:`bias_act`) of one shape, in ``grad``'s dtype."""
    dx = torch.empty_like(grad)
    if grad.numel():
        _act_backward_kernel[(triton.cdiv(grad.numel(), ACT_BLOCK),)](
            grad,
            pre,
            dx,
            grad.numel(),
            ACT=act,
            BLOCK=ACT_BLOCK,
            **triton_pdl.launch_kwargs(grad.device),
            **COMPILE_OPTIONS,
        )
    return dx


# ---------------------------------------------------------------- attention
@triton.jit
def _tile(ptr, sb, st, bi, col0, rows, n_rows, j, HD: tl.constexpr):
    """``[BLOCK_rows, BLOCK_D]`` tile of one head (columns ``col0 + j``) of sample ``bi``, in
    its storage dtype (the dots' operand type); rows ≥ ``n_rows`` and columns ≥ ``HD`` read 0."""
    ok = (rows < n_rows)[:, None] & (j < HD)[None, :]
    offs = bi * sb + rows.to(tl.int64)[:, None] * st + col0 + j[None, :]
    return tl.load(ptr + offs, mask=ok, other=0.0)


@triton.jit
def _scores(q, k, iq, it, tq, t, HD: tl.constexpr, C: tl.constexpr, INTERPRETED: tl.constexpr):
    """``QKᵀ/√hd`` [BLOCK_Q, BLOCK_K] with padded keys at −inf (padded queries stay finite)."""
    scale = 1.0 / tl.sqrt(tl.full([], HD, C))
    s = _dot(q, tl.trans(k), None, C, INTERPRETED) * scale
    return tl.where((it < t)[None, :], s, float("-inf"))


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tq, t, nh, q_sb, q_st, kv_sb, kv_st,
    HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # One program per (sample, head, block of BLOCK_Q queries): O = softmax(QKᵀ/√hd) V,
    # lse = log Σ exp(QKᵀ/√hd), over blocks of BLOCK_K keys with the running max / sum of
    # the online softmax.
    if PDL:
        pdl_wait()
    C: tl.constexpr = lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    bi, hi = (pid // nh).to(tl.int64), pid % nh
    iq, j = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_D)
    q = _tile(q_ptr, q_sb, q_st, bi, hi * HD, iq, tq, j, HD)
    m = tl.full([BLOCK_Q], float("-inf"), C)
    total = tl.zeros([BLOCK_Q], dtype=C)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=C)
    for k0 in range(0, t, BLOCK_K):  # every block holds ≥ 1 real key: m stays finite
        ik = k0 + tl.arange(0, BLOCK_K)
        k = _tile(k_ptr, kv_sb, kv_st, bi, hi * HD, ik, t, j, HD)
        v = _tile(v_ptr, kv_sb, kv_st, bi, hi * HD, ik, t, j, HD)
        s = _scores(q, k, iq, ik, tq, t, HD, C, INTERPRETED)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], C, INTERPRETED)
        m = m_new
    o = acc / total[:, None]
    d = nh * HD
    offs = (bi * tq + iq.to(tl.int64))[:, None] * d + hi * HD + j[None, :]
    ok = (iq < tq)[:, None] & (j < HD)[None, :]
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=ok)
    tl.store(lse_ptr + (bi * nh + hi) * tq + iq, m + tl.log(total), mask=iq < tq)


@triton.jit
def _query_tiles(
    q_ptr, o_ptr, do_ptr, lse_ptr, bi, hi, nh, iq, tq, q_sb, q_st, do_sb, do_st, j,
    HD: tl.constexpr, C: tl.constexpr,
):  # fmt: skip
    """A block of queries' part of the backward: ``(q, do, lse, delta)``, delta =
    rowsum(dO ⊙ O) = rowsum(P ⊙ dP)."""
    col = hi * HD
    q = _tile(q_ptr, q_sb, q_st, bi, col, iq, tq, j, HD)
    do = _tile(do_ptr, do_sb, do_st, bi, col, iq, tq, j, HD)
    o = _tile(o_ptr, tq * nh * HD, nh * HD, bi, col, iq, tq, j, HD)
    lse = tl.load(lse_ptr + (bi * nh + hi) * tq + iq, mask=iq < tq, other=0.0)
    return q, do, lse, tl.sum(do.to(C) * o.to(C), 1)


@triton.jit
def _probabilities(
    q, do, lse, delta, k, v, iq, ik, tq, t, HD: tl.constexpr, C: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """One (query block, key block) tile of the backward: ``(p, ds)``, P recomputed from lse
    and dS = P ⊙ (dP − delta)/√hd (dP = dO Vᵀ); both 0 on padded queries and keys, and in the
    tiles' storage dtype (the dots' operands)."""
    p = tl.exp(_scores(q, k, iq, ik, tq, t, HD, C, INTERPRETED) - lse[:, None])
    p = tl.where((iq < tq)[:, None] & (ik < t)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), None, C, INTERPRETED)
    ds = p * (dp - delta[:, None]) / tl.sqrt(tl.full([], HD, C))
    return p.to(k.dtype), ds.to(k.dtype)


@triton.jit
def _attention_backward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, tq, t, nh,
    q_sb, q_st, kv_sb, kv_st, do_sb, do_st, dq_sb, dq_st, dkv_sb, dkv_st,
    HD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Axis 1 of the grid: the first cdiv(t, BLOCK_K) programs of a (sample, head) each own a
    # block of keys, dK = Σ dSᵀ Q and dV = Σ Pᵀ dO over blocks of BLOCK_Q queries; the rest
    # each own a block of queries, dQ = Σ dS K over blocks of keys. Every gradient row is
    # summed in one program in a fixed order (no atomics); a program loads its own block
    # once and the other side's blocks in turn, so only one tile pair is live.
    if PDL:
        pdl_wait()
    C: tl.constexpr = lse_ptr.dtype.element_ty
    pid, blk = tl.program_id(0), tl.program_id(1)
    bi, hi = (pid // nh).to(tl.int64), pid % nh
    j = tl.arange(0, BLOCK_D)
    col, jok = hi * HD, (j < HD)[None, :]
    key_blocks = tl.cdiv(t, BLOCK_K)
    if blk < key_blocks:
        ik = blk * BLOCK_K + tl.arange(0, BLOCK_K)
        k = _tile(k_ptr, kv_sb, kv_st, bi, col, ik, t, j, HD)
        v = _tile(v_ptr, kv_sb, kv_st, bi, col, ik, t, j, HD)
        dk = tl.zeros([BLOCK_K, BLOCK_D], dtype=C)
        dv = tl.zeros([BLOCK_K, BLOCK_D], dtype=C)
        for q0 in range(0, tq, BLOCK_Q):
            iq = q0 + tl.arange(0, BLOCK_Q)
            q, do, lse, delta = _query_tiles(
                q_ptr, o_ptr, do_ptr, lse_ptr, bi, hi, nh, iq, tq, q_sb, q_st, do_sb, do_st, j,
                HD, C,
            )  # fmt: skip
            p, ds = _probabilities(q, do, lse, delta, k, v, iq, ik, tq, t, HD, C, INTERPRETED)
            dk = _dot(tl.trans(ds), q, dk, C, INTERPRETED)
            dv = _dot(tl.trans(p), do, dv, C, INTERPRETED)
        kv_offs = bi * dkv_sb + ik.to(tl.int64)[:, None] * dkv_st + col + j[None, :]
        kv_ok = (ik < t)[:, None] & jok
        tl.store(dk_ptr + kv_offs, dk.to(dk_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)
    else:
        iq = (blk - key_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q, do, lse, delta = _query_tiles(
            q_ptr, o_ptr, do_ptr, lse_ptr, bi, hi, nh, iq, tq, q_sb, q_st, do_sb, do_st, j, HD, C
        )  # fmt: skip
        dq = tl.zeros([BLOCK_Q, BLOCK_D], dtype=C)
        for k0 in range(0, t, BLOCK_K):
            ik = k0 + tl.arange(0, BLOCK_K)
            k = _tile(k_ptr, kv_sb, kv_st, bi, col, ik, t, j, HD)
            v = _tile(v_ptr, kv_sb, kv_st, bi, col, ik, t, j, HD)
            p, ds = _probabilities(q, do, lse, delta, k, v, iq, ik, tq, t, HD, C, INTERPRETED)
            dq = _dot(ds, k, dq, C, INTERPRETED)
        q_offs = bi * dq_sb + iq.to(tl.int64)[:, None] * dq_st + col + j[None, :]
        tl.store(dq_ptr + q_offs, dq.to(dq_ptr.dtype.element_ty), mask=(iq < tq)[:, None] & jok)


def attention_constants(
    queries: int, tokens: int, head_dim: int, dtype: torch.dtype, interpreted: bool = False,
    backward: bool = False, tile: Optional[tuple[int, int]] = None,
) -> dict:  # fmt: skip
    """The attention kernels' launch constants (``num_warps`` and ``num_stages`` included)
    for ``queries`` × ``tokens``, heads of ``head_dim`` and data stored in ``dtype``: blocks
    of at most the :data:`TILES` of the pass (``backward`` or the forward), or of ``tile``
    (queries, keys) where given, so that registers and shared memory do not grow with the
    token count; ``interpreted``: run by Triton's CPU interpreter (see
    :func:`ate_fast.ops.triton_dot.tile_dot`)."""
    pass_tiles = TILES["backward" if backward else "forward"]
    most_q, most_k = tile or pass_tiles[dtype.itemsize]
    block_q, block_k, block_d = (
        min(_block(queries), most_q),
        min(_block(tokens), most_k),
        _block(head_dim),
    )
    return dict(HD=head_dim, BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
                INTERPRETED=interpreted, num_warps=attention_warps(max(block_q, block_k), block_d),
                num_stages=1)  # fmt: skip


@_limits
def attention(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor, int]]:
    """Bidirectional multi-head attention without masks: ``q`` [B, Tq, d], ``k``, ``v``
    [B, T, d] (any T; any batch and row strides, unit column stride; k and v with the same
    strides, e.g. slices of one ``[B, T, 3d]`` projection) -> ``(o [B, Tq, d] with the heads
    merged, saved)``; ``saved = (q, k, v, o, lse [B, nh, Tq], num_heads)``."""
    batch, tq, d = q.shape
    if k.stride() != v.stride():
        raise ValueError("attention kernel: k and v must share their strides")
    o = torch.empty((batch, tq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_heads, tq), dtype=compute_dtype(q.dtype), device=q.device)
    if o.numel():
        constants = attention_constants(
            tq, k.shape[1], d // num_heads, q.dtype, q.device.type == "cpu"
        )
        grid = (batch * num_heads, triton.cdiv(tq, constants["BLOCK_Q"]))
        _attention_kernel[grid](
            q, k, v, o, lse, tq, k.shape[1], num_heads, *_rows(q), *_rows(k), **constants,
            **triton_pdl.launch_kwargs(q.device), **COMPILE_OPTIONS,
        )  # fmt: skip
    return o, (q, k, v, o, lse, num_heads)


@_limits
def attention_backward(
    grad: Tensor, saved: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int], dq: Tensor,
    dk: Tensor, dv: Tensor,
) -> None:  # fmt: skip
    """Write ``∂/∂q`` into ``dq`` [B, Tq, d] and ``∂/∂k``, ``∂/∂v`` into ``dk``, ``dv``
    [B, T, d] (views with a unit column stride; dk and dv with the same strides) for the
    gradient ``grad`` [B, Tq, d] of :func:`attention`'s output."""
    q, k, v, o, lse, num_heads = saved
    if dk.stride() != dv.stride():
        raise ValueError("attention kernel: dk and dv must share their strides")
    if grad.numel() == 0 and dk.numel() == 0:
        return
    (batch, tq, d), t = q.shape, k.shape[1]
    constants = attention_constants(
        tq, t, d // num_heads, q.dtype, q.device.type == "cpu", backward=True
    )
    blocks = triton.cdiv(t, constants["BLOCK_K"]) + triton.cdiv(tq, constants["BLOCK_Q"])
    _attention_backward_kernel[(batch * num_heads, blocks)](
        q, k, v, o, grad, lse, dq, dk, dv, tq, t, num_heads, *_rows(q), *_rows(k),
        *_rows(grad), *_rows(dq), *_rows(dk), **constants, **triton_pdl.launch_kwargs(q.device),
        **COMPILE_OPTIONS,
    )  # fmt: skip
