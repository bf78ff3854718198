"""Triton kernels of the flow-transformer block's element-wise epilogues (the ``triton``
path of :mod:`ate_fast.models.block_epilogues`; CUDA, or the CPU through
``TRITON_INTERPRET=1``).

**Status: CUDA's default since their H200 run (2026-12-04).** They pass the CPU tests
through the Triton interpreter (float32 and float64 storage; bfloat16 too), compile offline
for sm_87 and sm_90 (``tests/triton_offline_compile.py``, group ``flow_block``), passed the
cuda tests on an H200 with ``ATE_FAST_FLOW_EPILOGUES=triton``, and there made the π0
expert's captured bf16 call 1.31× (B = 1) and 1.38× (B = 8) faster than the torch ops,
matching ``sample()`` to 4.5e-3 / 5.5e-3 of max |output| (``bench_realsize.py``). The
input-VJP's kernels (real-time chunking) are tested by the cuda tests but not yet timed
on a GPU. Never run on a Jetson (sm_87: compiled offline only).

Two kernels per block for the forward, replacing ten (eight without a prefix):

* :func:`rotate_qkv` — rotary positions on the queries and the action rows' keys, the
  action rows' values, and the prefix's keys and values copied in front (or, into a call's
  ``PrefixSlot`` buffers that hold them already, the action rows only): the inputs of
  attention, from the two projections' outputs, in one launch (torch: 3 kernels per
  rotation and the values' copy). A 1-D grid in three ranges: query rows, action key/value
  rows, prefix rows; each program a tile of ``ROWS`` rows × the head dim.
* :func:`gated_gelu` — ``gelu_tanh(gate) · up`` from the gate/up projection's output
  ``[.., 2F]`` (torch: 2 kernels), optionally storing ``gelu_tanh(gate)`` (what the
  input-VJP reads). ``gelu_tanh(g) = g · sigmoid(2z)``, ``z = √(2/π)(g + 0.044715 g³)``:
  the same function as ``0.5 g (1 + tanh z)``.

Both take an optional ``norm`` (``NORM`` / :func:`_norm_gated_gelu_kernel`): the
projections then took the block's un-normed rows x with the RMSNorm's weight folded into
the weight matrix, and each row is scaled by ``1/√(mean(x²) + ε)`` from its row of x
(read ``NORM_CHUNK`` columns at a time) — that norm's kernel gone (one per folded norm,
block and step; the attention norm's by default, the MLP norm's with ``fold_mlp_norm``,
which is on by itself for a head whose norms are weightless, ``fold_norm_weights_``).

Four for the input-VJP (:mod:`ate_fast.models.flow_transformer_vjp`), replacing ≈ 42:

* :func:`gelu_gate_backward` — ``[dm·up·gelu′(gate), dm·gelu(gate)]`` into the gate/up
  projection's layout (torch: a product, ``gelu_backward``, a product, a concatenation);
* :func:`rms_norm_vjp` — RMSNorm's input-VJP with the residual branch's gradient added, one
  program per row (torch: ≈ 12 ops);
* :func:`softmax_backward` — the attention probabilities recomputed from the scores and the
  scores' gradient ``p⊙(dp − Σ p⊙dp)·scale``, one program per row (torch: 7 ops);
* :func:`unrotate_pack` — the rotation undone on dq and dk, with dq, dk and dv written in
  the q and kv projections' output layouts (torch: 8 ops with one kv head).

And :func:`softmax` — the probabilities of ``ATE_FAST_PREFIX_ATTENTION=gemm``
(:mod:`ate_fast.models.gemm_attention`) from its float32 scores, in the inputs' dtype
(torch: a scaling, the softmax and a cast) — with :func:`softmax_grad`, the scores'
gradient from the probabilities that path's forward kept (the input-VJP's then skips
:func:`softmax_backward`'s recompute). Not run on a GPU yet.

Arithmetic in float32 (float64 for float64 data), one rounding to the storage dtype per
output (torch's rotation rounds ``swap(x)·sin`` first, and its gated GELU rounds the GELU
before the product — the second is kept: the product reads the rounded GELU it stores).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ate_fast.models.gemm_alignment import aligned_rows
from ate_fast.ops import triton_pdl
from ate_fast.ops.triton_pdl import wait as pdl_wait
from ate_fast.ops.triton_resources import COMPILE_OPTIONS, launch_limits

_limits = launch_limits(
    "ATE_FAST_FLOW_EPILOGUES=triton",
    "Unset ATE_FAST_FLOW_EPILOGUES (or set it to torch) to run the torch ops.",
)

ROWS = 8  # rows of a rotate_qkv tile (× the head dim, ≤ 256 for π0: 2048 elements)
GELU_BLOCK = 1024  # elements per gated_gelu program
NUM_WARPS = 4
_TWO_SQRT_2_OVER_PI = tl.constexpr(2 * 0.7978845608028654)  # 2·√(2/π)


@triton.jit
def _compute(x):
    # the arithmetic type of data loaded as x: float64 stays, the rest is float32
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return x


@triton.jit
def _head_columns(head_dim, BLOCK_D: tl.constexpr):
    # a head's columns [BLOCK_D], each one's partner in the other half (rotate-half), and
    # which columns exist (head_dim ≤ BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    return cols, tl.where(cols < half, cols + half, cols - half), cols < head_dim


@triton.jit
def _grouped_row(r, horizon, kv_heads, group):
    # (b, token i, query head) of the rows r of a [B, kv_heads, H, group] layout: query heads
    # folded into the rows of their key/value head, token-major (group 1: keys, values)
    gi = r % group
    i = (r // group) % horizon
    bk = r // (group * horizon)
    return bk // kv_heads, i, (bk % kv_heads) * group + gi


@triton.jit
def _rotated(src_ptr, row_off, table_row, cos_ptr, sin_ptr, cols, swap, ok, head_dim):
    # x·cos + swap(x)·sin for the rows at src_ptr + row_off [R] (cols [D] within a head)
    x = _compute(tl.load(src_ptr + row_off[:, None] + cols[None, :], mask=ok, other=0.0))
    xs = _compute(tl.load(src_ptr + row_off[:, None] + swap[None, :], mask=ok, other=0.0))
    table = table_row[:, None] * head_dim + cols[None, :]
    c = _compute(tl.load(cos_ptr + table, mask=ok, other=0.0))
    s = _compute(tl.load(sin_ptr + table, mask=ok, other=0.0))
    return x * c + xs * s


@triton.jit
def _rstd_rows(x_ptr, rows, rows_ok, width, eps, R: tl.constexpr, CHUNK: tl.constexpr):
    # [R]: RMSNorm's 1/√(mean(x²) + eps) of the rows ``rows`` [R] of x [N, width]
    # (contiguous), summed CHUNK columns at a time (registers independent of the width)
    cols = tl.arange(0, CHUNK)
    base = x_ptr + rows[:, None] * width
    xv = _compute(tl.load(base + cols[None, :], mask=rows_ok[:, None] & (cols < width)[None, :],
                          other=0.0))  # fmt: skip
    acc = xv * xv
    for c in range(CHUNK, width, CHUNK):
        ok = rows_ok[:, None] & ((cols + c) < width)[None, :]
        xv = _compute(tl.load(base + c + cols[None, :], mask=ok, other=0.0))
        acc += xv * xv
    return 1.0 / tl.sqrt(tl.sum(acc, 1) / width + eps)


@triton.jit
def _rotate_qkv_kernel(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, pk_ptr, pv_ptr, qo_ptr, ko_ptr, vo_ptr,
    horizon, prefix, heads, kv_heads, head_dim, q_rows, kv_rows, p_rows, table_sb,
    q_sr, kv_sr, pk_sb, pk_sh, pk_sl, pv_sb, pv_sh, pv_sl, x_ptr, width, eps,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # q [B·H, heads·hd] and kv [B·H, 2·kv_heads·hd] (the projections' outputs; rows of
    # stride q_sr / kv_sr: column ranges of one fused projection's rows, or contiguous);
    # NORM: they projected the block's input x [B·H, width] (contiguous) itself, the
    # RMSNorm's weight folded into the projection, so each action row is scaled by its
    # token's 1/√(mean(x²) + eps) here (the norm's only per-row factor);
    # cos/sin [prefix + H, hd] (table_sb 0) or per sample [B, prefix + H, hd] (table_sb:
    # prefix + H rows per sample); prefix keys/values [B, kv_heads, L, hd] (strides given, the
    # last 1). Out: q [B, kv_heads, H·heads/kv_heads, hd] (rows (token, query head));
    # k, v [B, kv_heads, L + H, hd] (prefix rows first). PDL: launched with programmatic
    # dependent launch (ate_fast.ops.triton_pdl): nothing is touched before the wait.
    if PDL:
        pdl_wait()
    pid = tl.program_id(0)
    q_progs = tl.cdiv(q_rows, ROWS)
    kv_progs = tl.cdiv(kv_rows, ROWS)
    cols, swap, col_ok = _head_columns(head_dim, BLOCK_D)
    # each range in its own function: a compiled if/else must give a name one type
    if pid < q_progs:
        r = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _queries(q_ptr, cos_ptr, sin_ptr, qo_ptr, r, cols, swap, col_ok, horizon, prefix,
                 heads, kv_heads, head_dim, q_rows, table_sb, q_sr, x_ptr, width, eps,
                 ROWS, NORM, CHUNK)  # fmt: skip
    elif pid < q_progs + kv_progs:
        r = ((pid - q_progs) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _action_keys_values(kv_ptr, cos_ptr, sin_ptr, ko_ptr, vo_ptr, r, cols, swap, col_ok,
                            horizon, prefix, kv_heads, head_dim, kv_rows, table_sb,
                            kv_sr, x_ptr, width, eps, ROWS, NORM, CHUNK)  # fmt: skip
    else:
        r = ((pid - q_progs - kv_progs) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _prefix_keys_values(pk_ptr, pv_ptr, ko_ptr, vo_ptr, r, cols, col_ok, horizon, prefix,
                            kv_heads, head_dim, p_rows, pk_sb, pk_sh, pk_sl, pv_sb, pv_sh,
                            pv_sl)  # fmt: skip


@triton.jit
def _queries(
    q_ptr, cos_ptr, sin_ptr, qo_ptr, r, cols, swap, col_ok, horizon, prefix, heads, kv_heads,
    head_dim, q_rows, table_sb, q_sr, x_ptr, width, eps, ROWS: tl.constexpr,
    NORM: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # query rows r, ordered [B, kv_heads, H, heads/kv_heads] (_grouped_row)
    ok = (r < q_rows)[:, None] & col_ok[None, :]
    b, i, head = _grouped_row(r, horizon, kv_heads, heads // kv_heads)
    src = (b * horizon + i) * q_sr + head * head_dim
    out = _rotated(q_ptr, src, b * table_sb + prefix + i, cos_ptr, sin_ptr, cols, swap, ok,
                   head_dim)  # fmt: skip
    if NORM:  # the rotation is linear: scaling after it is scaling before
        out *= _rstd_rows(x_ptr, b * horizon + i, r < q_rows, width, eps, ROWS, CHUNK)[:, None]
    tl.store(qo_ptr + r[:, None] * head_dim + cols[None, :], out.to(qo_ptr.dtype.element_ty),
             mask=ok)  # fmt: skip


@triton.jit
def _action_keys_values(
    kv_ptr, cos_ptr, sin_ptr, ko_ptr, vo_ptr, r, cols, swap, col_ok, horizon, prefix,
    kv_heads, head_dim, kv_rows, table_sb, kv_sr, x_ptr, width, eps, ROWS: tl.constexpr,
    NORM: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # the action rows' keys (rotated) and values, rows r ordered [B, kv_heads, H]
    ok = (r < kv_rows)[:, None] & col_ok[None, :]
    i = r % horizon
    bh = r // horizon
    src = ((bh // kv_heads) * horizon + i) * kv_sr
    src += (bh % kv_heads) * head_dim
    table_row = (bh // kv_heads) * table_sb + prefix + i
    k = _rotated(kv_ptr, src, table_row, cos_ptr, sin_ptr, cols, swap, ok, head_dim)
    v = tl.load(kv_ptr + src[:, None] + kv_heads * head_dim + cols[None, :], mask=ok)
    if NORM:
        token = (bh // kv_heads) * horizon + i
        rstd = _rstd_rows(x_ptr, token, r < kv_rows, width, eps, ROWS, CHUNK)[:, None]
        k *= rstd
        v = _compute(v) * rstd
    dst = (bh * (prefix + horizon) + prefix + i)[:, None] * head_dim + cols[None, :]
    tl.store(ko_ptr + dst, k.to(ko_ptr.dtype.element_ty), mask=ok)
    tl.store(vo_ptr + dst, v.to(vo_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _prefix_keys_values(
    pk_ptr, pv_ptr, ko_ptr, vo_ptr, r, cols, col_ok, horizon, prefix, kv_heads, head_dim,
    p_rows, pk_sb, pk_sh, pk_sl, pv_sb, pv_sh, pv_sl,
):  # fmt: skip
    # the prefix's keys and values copied in front, rows r ordered [B, kv_heads, L]
    ok = (r < p_rows)[:, None] & col_ok[None, :]
    pos = r % prefix
    bh = r // prefix
    b, h = bh // kv_heads, bh % kv_heads
    k = tl.load(pk_ptr + (b * pk_sb + h * pk_sh + pos * pk_sl)[:, None] + cols[None, :],
                mask=ok)  # fmt: skip
    v = tl.load(pv_ptr + (b * pv_sb + h * pv_sh + pos * pv_sl)[:, None] + cols[None, :],
                mask=ok)  # fmt: skip
    dst = (bh * (prefix + horizon) + pos)[:, None] * head_dim + cols[None, :]
    tl.store(ko_ptr + dst, k.to(ko_ptr.dtype.element_ty), mask=ok)
    tl.store(vo_ptr + dst, v.to(vo_ptr.dtype.element_ty), mask=ok)


def token_rows(t: Tensor) -> Tensor:
    """``t`` [B, H, C] itself when its B·H rows are one stride apart with unit stride
    within (a contiguous tensor, or a column range of a wider one: the fused q|kv
    projection's output), else a contiguous copy."""
    rows_even = t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)
    return t if t.stride(-1) == 1 and rows_even else t.contiguous()


@_limits
def rotate_qkv(
    q_lin: Tensor,
    kv_lin: Tensor,
    cos: Tensor,
    sin: Tensor,
    prefix: Optional[tuple[Tensor, Tensor]],
    heads: int,
    kv_heads: int,
    out: Optional[tuple[Tensor, Tensor]] = None,
    norm: Optional[tuple[Tensor, float]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(q [B, kv_heads, H·heads/kv_heads, hd], k, v [B, kv_heads, L + H, hd])`` (q's rows
    ordered (token, query head) within each kv head), contiguous, from
    ``q_lin`` [B, H, heads·hd], ``kv_lin`` [B, H, 2·kv_heads·hd] (:func:`token_rows`: unit
    stride within a row, one stride between the B·H rows), the rotary
    tables [L + H, hd] or per sample [B, 1, L + H, hd] (contiguous) and the prefix's
    ``(keys, values)`` [B, kv_heads, L, hd] (unit stride on hd) or None (L = 0).
    ``out``: contiguous ``(k, v)`` buffers holding the prefix's rows already
    (``block_epilogues.PrefixSlot``): only the action rows are written, into them.
    ``norm``: ``(x [B, H, width] contiguous, eps)`` when q_lin and kv_lin are projections of
    the block's input x itself (the RMSNorm's weight folded into the projection): each
    action row is then scaled by its token's ``1/√(mean(x²) + eps)``."""
    batch, horizon, width = q_lin.shape
    head_dim = width // heads
    length = 0 if prefix is None else prefix[0].shape[2]
    total = length + horizon
    q = q_lin.new_empty(batch, kv_heads, horizon * (heads // kv_heads), head_dim)
    if out is None:
        k = kv_lin.new_empty(batch, kv_heads, total, head_dim)
        v = torch.empty_like(k)
    else:
        k, v = out
    pk, pv = prefix if prefix is not None else (k, v)  # unread when L = 0
    q_rows, kv_rows, p_rows = batch * heads * horizon, batch * kv_heads * horizon, 0
    if prefix is not None and out is None:  # the prefix's rows (already in out's)
        p_rows = batch * kv_heads * length
    grid = (triton.cdiv(q_rows, ROWS) + triton.cdiv(kv_rows, ROWS) + triton.cdiv(p_rows, ROWS),)
    _rotate_qkv_kernel[grid](
        q_lin, kv_lin, cos, sin, pk, pv, q, k, v,
        horizon, length, heads, kv_heads, head_dim, q_rows, kv_rows, p_rows, _table_rows(cos),
        q_lin.stride(1), kv_lin.stride(1), pk.stride(0), pk.stride(1), pk.stride(2),
        pv.stride(0), pv.stride(1), pv.stride(2),
        *_norm_args(norm, q_lin), ROWS=ROWS, BLOCK_D=triton.next_power_of_2(head_dim),
        NORM=norm is not None, CHUNK=_chunk(norm), num_warps=NUM_WARPS,
        **triton_pdl.launch_kwargs(q_lin.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return q, k, v


NORM_CHUNK = 256  # columns of x per step of a row's mean(x²) (_rstd_rows)


def _norm_args(norm: Optional[tuple[Tensor, float]], unread: Tensor) -> tuple:
    """``(x, width, eps)`` for a kernel's NORM arguments (``unread`` stands in for x and
    is never read when ``norm`` is None)."""
    if norm is None:
        return unread, 1, 0.0
    x, eps = norm
    return x, x.shape[-1], float(eps)


def _chunk(norm: Optional[tuple[Tensor, float]]) -> int:
    """The CHUNK constexpr: the width's next power of two up to ``NORM_CHUNK`` (16 without
    a norm: one variant)."""
    return 16 if norm is None else min(triton.next_power_of_2(norm[0].shape[-1]), NORM_CHUNK)


@triton.jit
def _gelu_tanh(g):
    # gelu_tanh(g) = g·sigmoid(2z), z = √(2/π)(g + 0.044715 g³), in g's arithmetic type
    z2 = _TWO_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    ez = tl.exp(-tl.abs(z2))  # sigmoid(z2) without overflow: 1/(1+ez) or ez/(1+ez)
    return g * tl.where(z2 >= 0, 1.0, ez) / (1.0 + ez)


@triton.jit
def _gated_gelu_kernel(
    gu_ptr, out_ptr, act_ptr, n, mlp, SAVE_ACT: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # gu [M, 2F] (gate | up); out, act [M, F]; n = M·F
    if PDL:
        pdl_wait()
    e = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = e < n
    src = (e // mlp) * (2 * mlp) + e % mlp
    g = _compute(tl.load(gu_ptr + src, mask=ok, other=0.0))
    u = _compute(tl.load(gu_ptr + src + mlp, mask=ok, other=0.0))
    act = _gelu_tanh(g).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + e, (_compute(act) * u).to(out_ptr.dtype.element_ty), mask=ok)
    if SAVE_ACT:
        tl.store(act_ptr + e, act, mask=ok)


@triton.jit
def _norm_gated_gelu_kernel(
    gu_ptr, x_ptr, out_ptr, act_ptr, mlp, width, eps, SAVE_ACT: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # gu [M, 2F] = x·W'ᵀ (gate | up; the MLP norm's weight folded into W'), x [M, width]
    # (both contiguous): gate and up scaled by the row's 1/√(mean(x²) + eps) — RMSNorm's
    # per-row factor — before the gated GELU; SAVE_ACT: the scaled gate and up written back
    # into gu (what the input-VJP reads) and gelu_tanh(gate) into act. A program: BLOCK
    # columns of one row (its rstd from the row's width elements of x).
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < mlp
    one = row + tl.arange(0, 1)
    rstd = tl.sum(_rstd_rows(x_ptr, one, one >= 0, width, eps, 1, CHUNK), 0)
    src = row * (2 * mlp) + cols
    g = _compute(tl.load(gu_ptr + src, mask=ok, other=0.0)) * rstd
    u = _compute(tl.load(gu_ptr + src + mlp, mask=ok, other=0.0)) * rstd
    act = _gelu_tanh(g).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * mlp + cols, (_compute(act) * u).to(out_ptr.dtype.element_ty),
             mask=ok)  # fmt: skip
    if SAVE_ACT:
        tl.store(act_ptr + row * mlp + cols, act, mask=ok)
        tl.store(gu_ptr + src, g.to(gu_ptr.dtype.element_ty), mask=ok)
        tl.store(gu_ptr + src + mlp, u.to(gu_ptr.dtype.element_ty), mask=ok)


@_limits
def gated_gelu(
    gate_up: Tensor, save_act: bool, norm: Optional[tuple[Tensor, float]] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """``(gelu_tanh(gate)·up, gelu_tanh(gate) or None)`` [.., F] from ``gate_up`` [.., 2F]
    (contiguous; gate first). ``norm``: ``(x [.., width] contiguous, eps)`` when gate_up is
    a projection of x itself (the RMSNorm's weight folded into it): gate and up are first
    scaled by their row's ``1/√(mean(x²) + eps)``, and with ``save_act`` written back into
    ``gate_up`` so scaled (what the input-VJP reads)."""
    mlp = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], mlp)
    out = gate_up.new_empty(shape)
    act = gate_up.new_empty(shape) if save_act else out  # unwritten when not saved
    if norm is None:
        n = out.numel()
        _gated_gelu_kernel[(triton.cdiv(n, GELU_BLOCK),)](
            gate_up, out, act, n, mlp, SAVE_ACT=save_act, BLOCK=GELU_BLOCK,
            num_warps=NUM_WARPS, **triton_pdl.launch_kwargs(gate_up.device), **COMPILE_OPTIONS,
        )  # fmt: skip
    elif out.numel():
        x, width, eps = _norm_args(norm, gate_up)
        block = min(triton.next_power_of_2(mlp), GELU_BLOCK)
        _norm_gated_gelu_kernel[(out.numel() // mlp, triton.cdiv(mlp, block))](
            gate_up, x, out, act, mlp, width, eps, SAVE_ACT=save_act, BLOCK=block,
            CHUNK=_chunk(norm), num_warps=NUM_WARPS, **triton_pdl.launch_kwargs(gate_up.device),
            **COMPILE_OPTIONS,
        )  # fmt: skip
    return out, act if save_act else None


# ------------------------------------------------------------------ the input-VJP's epilogues
@triton.jit
def _gelu_gate_backward_kernel(
    dm_ptr, gate_ptr, up_ptr, act_ptr, out_ptr, n, mlp, gate_sr, up_sr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # dm, act [M, F] contiguous; gate, up rows of stride gate_sr / up_sr; out [M, 2F]:
    # [dm·up·gelu'(gate) | dm·act]. gelu'(g) = s + 2g·s(1−s)·√(2/π)(1 + 3·0.044715 g²),
    # s = sigmoid(2z) (= (1 + tanh z)/2).
    if PDL:
        pdl_wait()
    e = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = e < n
    row, col = e // mlp, e % mlp
    dm = _compute(tl.load(dm_ptr + e, mask=ok, other=0.0))
    g = _compute(tl.load(gate_ptr + row * gate_sr + col, mask=ok, other=0.0))
    u = _compute(tl.load(up_ptr + row * up_sr + col, mask=ok, other=0.0))
    a = _compute(tl.load(act_ptr + e, mask=ok, other=0.0))
    z2 = _TWO_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    ez = tl.exp(-tl.abs(z2))
    s = tl.where(z2 >= 0, 1.0, ez) / (1.0 + ez)
    slope = s + (_TWO_SQRT_2_OVER_PI * g) * s * (1.0 - s) * (1.0 + 3 * 0.044715 * g * g)
    dst = row * (2 * mlp) + col
    tl.store(out_ptr + dst, (dm * u * slope).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + dst + mlp, (dm * a).to(out_ptr.dtype.element_ty), mask=ok)


@_limits
def gelu_gate_backward(dm: Tensor, gate: Tensor, up: Tensor, act: Tensor) -> Tensor:
    """``[dm·up·gelu_tanh′(gate), dm·act]`` [.., 2F] from ``dm``, ``act`` [.., F]
    (contiguous) and ``gate``, ``up`` [.., F] (rows of any stride, unit stride within)."""
    mlp = dm.shape[-1]
    out = dm.new_empty(*dm.shape[:-1], 2 * mlp)
    n = dm.numel()
    _gelu_gate_backward_kernel[(triton.cdiv(n, GELU_BLOCK),)](
        dm, gate, up, act, out, n, mlp, gate.stride(-2), up.stride(-2),
        BLOCK=GELU_BLOCK, num_warps=NUM_WARPS, **triton_pdl.launch_kwargs(dm.device),
        **COMPILE_OPTIONS,
    )  # fmt: skip
    return out


@triton.jit
def _rms_norm_vjp_kernel(
    g_ptr, x_ptr, w_ptr, r_ptr, out_ptr, width, eps,
    HAS_W: tl.constexpr, HAS_R: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # one program per row: out = r + rstd·(g⊙w − x̂·mean(g⊙w⊙x̂)), x̂ = x·rstd,
    # rstd = 1/√(mean(x²) + eps); rows contiguous
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    x = _compute(tl.load(x_ptr + row * width + cols, mask=ok, other=0.0))
    gw = _compute(tl.load(g_ptr + row * width + cols, mask=ok, other=0.0))
    if HAS_W:
        gw = gw * _compute(tl.load(w_ptr + cols, mask=ok, other=0.0))
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / width + eps)
    xhat = x * rstd
    dx = rstd * (gw - xhat * (tl.sum(gw * xhat, 0) / width))
    if HAS_R:
        dx = dx + _compute(tl.load(r_ptr + row * width + cols, mask=ok, other=0.0))
    tl.store(out_ptr + row * width + cols, dx.to(out_ptr.dtype.element_ty), mask=ok)


@_limits
def rms_norm_vjp(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], eps: float, residual: Optional[Tensor]
) -> Tensor:
    """``residual + (∂ rms_norm(x)/∂x)ᵀ grad`` [.., width], all contiguous, in one pass."""
    width = x.shape[-1]
    dtype = grad.dtype  # torch's type promotion, as the torch ops would give
    for t in (x, weight, residual):
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    w = weight if weight is not None else x
    r = residual if residual is not None else x
    _rms_norm_vjp_kernel[(x.numel() // width,)](
        grad, x, w, r, out, width, eps, HAS_W=weight is not None, HAS_R=residual is not None,
        BLOCK=triton.next_power_of_2(width), num_warps=NUM_WARPS,
        **triton_pdl.launch_kwargs(x.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return out


@triton.jit
def _softmax_of(s, ok):
    # softmax of the logits s over the columns `ok` (the others get 0)
    s = tl.where(ok, s, -float("inf"))
    e = tl.exp(s - tl.max(s, 0))
    return e / tl.sum(e, 0)


@triton.jit
def _row_softmax(s_ptr, row, s_sr, cols, ok, scale):
    # softmax(s·scale) of row `row` of scores s (rows of stride s_sr; columns `ok` of `cols`)
    return _softmax_of(_compute(tl.load(s_ptr + row * s_sr + cols, mask=ok, other=0.0)) * scale, ok)


@triton.jit
def _softmax_backward_kernel(
    s_ptr, dp_ptr, p_ptr, ds_ptr, n, s_sr, dp_sr, out_sr, scale,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # one program per row of scores s [R, n] (rows of stride s_sr, dp's dp_sr, the outputs'
    # out_sr): p = softmax(s·scale) (stored) and ds = p⊙(dp − Σ p⊙dp)·scale
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    p = _row_softmax(s_ptr, row, s_sr, cols, ok, scale)
    dp = _compute(tl.load(dp_ptr + row * dp_sr + cols, mask=ok, other=0.0))
    ds = p * (dp - tl.sum(p * dp, 0)) * scale
    tl.store(p_ptr + row * out_sr + cols, p.to(p_ptr.dtype.element_ty), mask=ok)
    tl.store(ds_ptr + row * out_sr + cols, ds.to(ds_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_kernel(
    s_ptr, b_ptr, p_ptr, n, s_sr, b_sr, p_sr, per_bias, scale,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # one program per row of scores s [R, n] (float32 or float64, rows of stride s_sr):
    # p = softmax(s·scale + b) rounded once to p's dtype (rows of stride p_sr); b: row
    # row // per_bias of the additive mask b [R / per_bias, n] (rows of stride b_sr)
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    s = _compute(tl.load(s_ptr + row * s_sr + cols, mask=ok, other=0.0)) * scale
    if HAS_BIAS:
        b_row = b_ptr + (row // per_bias) * b_sr
        s += _compute(tl.load(b_row + cols, mask=ok, other=0.0))
    tl.store(p_ptr + row * p_sr + cols, _softmax_of(s, ok).to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_grad_kernel(
    p_ptr, dp_ptr, ds_ptr, n, p_sr, dp_sr, ds_sr, scale, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    # one program per row of probabilities p [R, n] (kept by the forward): the scores'
    # gradient ds = p⊙(dp − Σ p⊙dp)·scale
    if PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    p = _compute(tl.load(p_ptr + row * p_sr + cols, mask=ok, other=0.0))
    dp = _compute(tl.load(dp_ptr + row * dp_sr + cols, mask=ok, other=0.0))
    ds = p * (dp - tl.sum(p * dp, 0)) * scale
    tl.store(ds_ptr + row * ds_sr + cols, ds.to(ds_ptr.dtype.element_ty), mask=ok)


@_limits
def softmax_grad(p: Tensor, dp: Tensor, scale: float) -> Tensor:
    """``p⊙(dp − rowsum(p⊙dp))·scale`` [.., N] from the probabilities ``p`` a forward kept
    and ``dp`` [.., N] (rows of one stride each: read in place), into 16-byte-aligned rows
    (the GEMMs of dq and dk read them)."""
    n = p.shape[-1]
    p_rows, dp_rows = _as_rows(p), _as_rows(dp)
    ds = aligned_rows(p.shape, p)
    ds_rows = ds.view(-1, n)
    _softmax_grad_kernel[(p_rows.shape[0],)](
        p_rows, dp_rows, ds_rows, n, p_rows.stride(0), dp_rows.stride(0), ds_rows.stride(0),
        scale, BLOCK=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        **triton_pdl.launch_kwargs(p.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return ds


@_limits
def softmax(
    scores: Tensor, scale: float, dtype: torch.dtype, bias: Optional[Tensor] = None,
    per_bias: int = 1,
) -> Tensor:  # fmt: skip
    """``softmax(scores·scale + bias)`` [.., N] in ``dtype`` (one rounding), from ``scores``
    [.., N] (rows of one stride: read in place), into 16-byte-aligned rows (the product with
    the values reads them: :mod:`ate_fast.models.gemm_alignment`) — the gemm attention's
    probabilities (:mod:`ate_fast.models.gemm_attention`). ``bias``: None, or an additive
    mask whose rows (N each) serve ``per_bias`` consecutive rows of scores each."""
    n = scores.shape[-1]
    s_rows = _as_rows(scores)
    p = aligned_rows(scores.shape, scores.new_empty((), dtype=dtype))
    p_rows = p.view(-1, n)
    b_rows = s_rows if bias is None else _as_rows(bias)  # (unread without a bias)
    _softmax_kernel[(s_rows.shape[0],)](
        s_rows, b_rows, p_rows, n, s_rows.stride(0), b_rows.stride(0), p_rows.stride(0),
        per_bias, scale, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(n),
        num_warps=NUM_WARPS, **triton_pdl.launch_kwargs(scores.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return p


def _as_rows(t: Tensor) -> Tensor:
    """``t`` [.., n] as [R, n] rows of one stride: a view where its layout allows (a
    :func:`~ate_fast.models.gemm_alignment.aligned_rows` buffer, a contiguous tensor), else
    a contiguous copy."""
    n = t.shape[-1]
    if t.stride(-1) == 1:
        try:
            return t.view(-1, n)
        except RuntimeError:  # rows of more than one stride
            pass
    return t.contiguous().view(-1, n)


@_limits
def softmax_backward(scores: Tensor, dp: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(p, ds)`` [.., N]: ``p = softmax(scores·scale)`` and the scores' gradient
    ``p⊙(dp − rowsum(p⊙dp))·scale``, from ``scores``, ``dp`` [.., N] (rows of one stride
    each: read in place); ``p`` and ``ds`` with 16-byte-aligned rows (the GEMMs that read
    them: :mod:`ate_fast.models.gemm_alignment`)."""
    n = scores.shape[-1]
    s_rows, dp_rows = _as_rows(scores), _as_rows(dp)
    p, ds = aligned_rows(scores.shape, scores), aligned_rows(scores.shape, scores)
    p_rows, ds_rows = p.view(-1, n), ds.view(-1, n)
    _softmax_backward_kernel[(s_rows.shape[0],)](
        s_rows, dp_rows, p_rows, ds_rows, n, s_rows.stride(0), dp_rows.stride(0),
        p_rows.stride(0), scale, BLOCK=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        **triton_pdl.launch_kwargs(scores.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return p, ds


@triton.jit
def _unrotate_pack_kernel(
    dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqo_ptr, dkvo_ptr,
    horizon, heads, kv_heads, head_dim, table_offset, table_sb, q_rows, kv_rows, dq_sr, dkv_sr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # dq [B, kv_heads, H·heads/kv_heads, hd] (rows (token, query head)), dk, dv
    # [B, kv_heads, H, hd] (contiguous) -> dq [B, H, heads·hd] unrotated and
    # [dk unrotated | dv] [B, H, 2·kv_heads·hd]: the projections' layouts, rows of stride
    # dq_sr / dkv_sr (two buffers, or the column ranges of one fused projection's)
    if PDL:
        pdl_wait()
    pid = tl.program_id(0)
    q_progs = tl.cdiv(q_rows, ROWS)
    cols, swap, col_ok = _head_columns(head_dim, BLOCK_D)
    if pid < q_progs:
        r = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _unrotate_rows(dq_ptr, dv_ptr, cos_ptr, sin_ptr, dqo_ptr, r, cols, swap, col_ok,
                       horizon, kv_heads, heads // kv_heads, head_dim, table_offset, table_sb,
                       q_rows, dq_sr, HAS_V=False)  # fmt: skip
    else:
        r = ((pid - q_progs) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _unrotate_rows(dk_ptr, dv_ptr, cos_ptr, sin_ptr, dkvo_ptr, r, cols, swap, col_ok,
                       horizon, kv_heads, 1, head_dim, table_offset, table_sb, kv_rows,
                       dkv_sr, HAS_V=True)  # fmt: skip


@triton.jit
def _unrotate_rows(
    src_ptr, v_ptr, cos_ptr, sin_ptr, dst_ptr, r, cols, swap, col_ok, horizon, kv_heads, group,
    head_dim, table_offset, table_sb, rows, dst_sr, HAS_V: tl.constexpr,
):  # fmt: skip
    # rows r of src [B, kv_heads, H, group, hd] (_grouped_row): g·cos − swap(g)·sin into dst
    # [B, H, (1 + HAS_V)·heads·hd] (rows of stride dst_sr) at its head (heads =
    # kv_heads·group); v's row (group 1) copied after all the heads when HAS_V
    ok = (r < rows)[:, None] & col_ok[None, :]
    b, i, h = _grouped_row(r, horizon, kv_heads, group)
    heads = kv_heads * group
    src = r[:, None] * head_dim
    g = _compute(tl.load(src_ptr + src + cols[None, :], mask=ok, other=0.0))
    gs = _compute(tl.load(src_ptr + src + swap[None, :], mask=ok, other=0.0))
    table = (b * table_sb + table_offset + i)[:, None] * head_dim + cols[None, :]
    c = _compute(tl.load(cos_ptr + table, mask=ok, other=0.0))
    s = _compute(tl.load(sin_ptr + table, mask=ok, other=0.0))
    out = g * c - gs * s  # the rotation's transpose (rotation by −angle)
    dst = (b * horizon + i)[:, None] * dst_sr + (h * head_dim)[:, None] + cols[None, :]
    tl.store(dst_ptr + dst, out.to(dst_ptr.dtype.element_ty), mask=ok)
    if HAS_V:
        v = tl.load(v_ptr + r[:, None] * head_dim + cols[None, :], mask=ok)
        tl.store(dst_ptr + dst + heads * head_dim, v.to(dst_ptr.dtype.element_ty), mask=ok)


def _table_rows(cos: Tensor) -> int:
    """Rows per sample of rotary tables: 0 for shared [N, hd], N for per-sample [B, 1, N, hd]
    (a padded prefix's positions)."""
    return 0 if cos.dim() == 2 else cos.shape[-2]


@_limits
def unrotate_pack(
    dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, out: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``(dq [B, H, heads·hd], [dk | dv] [B, H, 2·kv_heads·hd])`` from ``dq``
    [B, kv_heads, H·heads/kv_heads, hd] (rows (token, query head)) and ``dk``, ``dv``
    [B, kv_heads, H, hd] (contiguous), the rotation undone on dq and dk with the tables'
    last H rows of ``cos``, ``sin`` [N, hd] or per sample [B, 1, N, hd] (contiguous).
    ``out``: None (two new contiguous tensors), or one contiguous [B, H, (heads +
    2·kv_heads)·hd] that receives both side by side (the two returned are its column
    ranges)."""
    batch, kv_heads, horizon, head_dim = dk.shape
    heads = kv_heads * (dq.shape[2] // horizon)
    if out is None:
        dqo = dq.new_empty(batch, horizon, heads * head_dim)
        dkvo = dk.new_empty(batch, horizon, 2 * kv_heads * head_dim)
    else:
        dqo, dkvo = out.split([heads * head_dim, 2 * kv_heads * head_dim], dim=-1)
    q_rows, kv_rows = batch * heads * horizon, batch * kv_heads * horizon
    grid = (triton.cdiv(q_rows, ROWS) + triton.cdiv(kv_rows, ROWS),)
    _unrotate_pack_kernel[grid](
        dq, dk, dv, cos, sin, dqo, dkvo, horizon, heads, kv_heads, head_dim,
        cos.shape[-2] - horizon, _table_rows(cos), q_rows, kv_rows, dqo.stride(1),
        dkvo.stride(1), ROWS=ROWS, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=NUM_WARPS, **triton_pdl.launch_kwargs(dq.device), **COMPILE_OPTIONS,
    )  # fmt: skip
    return dqo, dkvo
