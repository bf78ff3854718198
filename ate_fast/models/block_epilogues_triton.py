"""Triton kernels of the flow-transformer block's element-wise epilogues (the ``triton``
path of :mod:`ate_fast.models.block_epilogues`; CUDA, or the CPU through
``TRITON_INTERPRET=1``).

**Status: these kernels have never run on a GPU.** They pass the CPU tests through the
Triton interpreter (float32 and float64 storage; bfloat16 too) and compile offline for
sm_87 and sm_90 (``tests/triton_offline_compile.py``, group ``flow_block``); their speed is
unmeasured, so the path is opt-in (``ATE_FAST_FLOW_EPILOGUES=triton``).

Two kernels per block, replacing eight (nine without a prefix: seven) torch kernels:

* :func:`rotate_qkv` — rotary positions on the queries and the action rows' keys, the
  action rows' values, and the prefix's keys and values copied in front: the inputs of
  attention, from the two projections' outputs, in one launch (torch: 3 kernels per
  rotation, two concatenations). A 1-D grid in three ranges: query rows, action key/value
  rows, prefix rows; each program a tile of ``ROWS`` rows × the head dim.
* :func:`gated_gelu` — ``gelu_tanh(gate) · up`` from the gate/up projection's output
  ``[.., 2F]`` (torch: 2 kernels), optionally storing ``gelu_tanh(gate)`` (what the
  input-VJP reads). ``gelu_tanh(g) = g · sigmoid(2z)``, ``z = √(2/π)(g + 0.044715 g³)``:
  the same function as ``0.5 g (1 + tanh z)``.

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
def _rotated(src_ptr, row_off, table_row, cos_ptr, sin_ptr, cols, swap, ok, head_dim):
    # x·cos + swap(x)·sin for the rows at src_ptr + row_off [R] (cols [D] within a head)
    x = _compute(tl.load(src_ptr + row_off[:, None] + cols[None, :], mask=ok, other=0.0))
    xs = _compute(tl.load(src_ptr + row_off[:, None] + swap[None, :], mask=ok, other=0.0))
    table = table_row[:, None] * head_dim + cols[None, :]
    c = _compute(tl.load(cos_ptr + table, mask=ok, other=0.0))
    s = _compute(tl.load(sin_ptr + table, mask=ok, other=0.0))
    return x * c + xs * s


@triton.jit
def _rotate_qkv_kernel(
    q_ptr, kv_ptr, cos_ptr, sin_ptr, pk_ptr, pv_ptr, qo_ptr, ko_ptr, vo_ptr,
    horizon, prefix, heads, kv_heads, head_dim, q_rows, kv_rows, p_rows,
    pk_sb, pk_sh, pk_sl, pv_sb, pv_sh, pv_sl,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # q [B·H, heads·hd] and kv [B·H, 2·kv_heads·hd] (the projections' outputs, contiguous);
    # cos/sin [prefix + H, hd]; prefix keys/values [B, kv_heads, L, hd] (strides given, the
    # last 1). Out: q [B, heads, H, hd]; k, v [B, kv_heads, L + H, hd] (prefix rows first).
    pid = tl.program_id(0)
    q_progs = tl.cdiv(q_rows, ROWS)
    kv_progs = tl.cdiv(kv_rows, ROWS)
    cols = tl.arange(0, BLOCK_D)
    half = head_dim // 2
    swap = tl.where(cols < half, cols + half, cols - half)
    col_ok = cols < head_dim
    # each range in its own function: a compiled if/else must give a name one type
    if pid < q_progs:
        r = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _queries(q_ptr, cos_ptr, sin_ptr, qo_ptr, r, cols, swap, col_ok, horizon, prefix,
                 heads, head_dim, q_rows)  # fmt: skip
    elif pid < q_progs + kv_progs:
        r = ((pid - q_progs) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _action_keys_values(kv_ptr, cos_ptr, sin_ptr, ko_ptr, vo_ptr, r, cols, swap, col_ok,
                            horizon, prefix, kv_heads, head_dim, kv_rows)  # fmt: skip
    else:
        r = ((pid - q_progs - kv_progs) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        _prefix_keys_values(pk_ptr, pv_ptr, ko_ptr, vo_ptr, r, cols, col_ok, horizon, prefix,
                            kv_heads, head_dim, p_rows, pk_sb, pk_sh, pk_sl, pv_sb, pv_sh,
                            pv_sl)  # fmt: skip


@triton.jit
def _queries(
    q_ptr, cos_ptr, sin_ptr, qo_ptr, r, cols, swap, col_ok, horizon, prefix, heads, head_dim,
    q_rows,
):  # fmt: skip
    # query rows r, ordered [B, heads, H]
    ok = (r < q_rows)[:, None] & col_ok[None, :]
    i = r % horizon
    bh = r // horizon
    src = ((bh // heads) * horizon + i) * (heads * head_dim) + (bh % heads) * head_dim
    out = _rotated(q_ptr, src, prefix + i, cos_ptr, sin_ptr, cols, swap, ok, head_dim)
    tl.store(qo_ptr + r[:, None] * head_dim + cols[None, :], out.to(qo_ptr.dtype.element_ty),
             mask=ok)  # fmt: skip


@triton.jit
def _action_keys_values(
    kv_ptr, cos_ptr, sin_ptr, ko_ptr, vo_ptr, r, cols, swap, col_ok, horizon, prefix,
    kv_heads, head_dim, kv_rows,
):  # fmt: skip
    # the action rows' keys (rotated) and values, rows r ordered [B, kv_heads, H]
    ok = (r < kv_rows)[:, None] & col_ok[None, :]
    i = r % horizon
    bh = r // horizon
    src = ((bh // kv_heads) * horizon + i) * (2 * kv_heads * head_dim)
    src += (bh % kv_heads) * head_dim
    k = _rotated(kv_ptr, src, prefix + i, cos_ptr, sin_ptr, cols, swap, ok, head_dim)
    v = tl.load(kv_ptr + src[:, None] + kv_heads * head_dim + cols[None, :], mask=ok)
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


def rotate_qkv(
    q_lin: Tensor,
    kv_lin: Tensor,
    cos: Tensor,
    sin: Tensor,
    prefix: Optional[tuple[Tensor, Tensor]],
    heads: int,
    kv_heads: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(q [B, heads, H, hd], k, v [B, kv_heads, L + H, hd])``, contiguous, from
    ``q_lin`` [B, H, heads·hd], ``kv_lin`` [B, H, 2·kv_heads·hd] (contiguous), the rotary
    tables [L + H, hd] (contiguous) and the prefix's ``(keys, values)`` [B, kv_heads, L, hd]
    (unit stride on hd) or None (L = 0)."""
    batch, horizon, width = q_lin.shape
    head_dim = width // heads
    length = 0 if prefix is None else prefix[0].shape[2]
    total = length + horizon
    q = q_lin.new_empty(batch, heads, horizon, head_dim)
    k = kv_lin.new_empty(batch, kv_heads, total, head_dim)
    v = torch.empty_like(k)
    pk, pv = prefix if prefix is not None else (k, v)  # unread when L = 0
    q_rows, kv_rows, p_rows = batch * heads * horizon, batch * kv_heads * horizon, 0
    if prefix is not None:
        p_rows = batch * kv_heads * length
    grid = (triton.cdiv(q_rows, ROWS) + triton.cdiv(kv_rows, ROWS) + triton.cdiv(p_rows, ROWS),)
    _rotate_qkv_kernel[grid](
        q_lin, kv_lin, cos, sin, pk, pv, q, k, v,
        horizon, length, heads, kv_heads, head_dim, q_rows, kv_rows, p_rows,
        pk.stride(0), pk.stride(1), pk.stride(2), pv.stride(0), pv.stride(1), pv.stride(2),
        ROWS=ROWS, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=NUM_WARPS,
    )  # fmt: skip
    return q, k, v


@triton.jit
def _gated_gelu_kernel(
    gu_ptr, out_ptr, act_ptr, n, mlp, SAVE_ACT: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    # gu [M, 2F] (gate | up); out, act [M, F]; n = M·F
    e = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = e < n
    src = (e // mlp) * (2 * mlp) + e % mlp
    g = _compute(tl.load(gu_ptr + src, mask=ok, other=0.0))
    u = _compute(tl.load(gu_ptr + src + mlp, mask=ok, other=0.0))
    z2 = _TWO_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
    ez = tl.exp(-tl.abs(z2))  # sigmoid(z2) without overflow: 1/(1+ez) or ez/(1+ez)
    act = (g * tl.where(z2 >= 0, 1.0, ez) / (1.0 + ez)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + e, (_compute(act) * u).to(out_ptr.dtype.element_ty), mask=ok)
    if SAVE_ACT:
        tl.store(act_ptr + e, act, mask=ok)


def gated_gelu(gate_up: Tensor, save_act: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(gelu_tanh(gate)·up, gelu_tanh(gate) or None)`` [.., F] from ``gate_up`` [.., 2F]
    (contiguous; gate first)."""
    mlp = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], mlp)
    out = gate_up.new_empty(shape)
    act = gate_up.new_empty(shape) if save_act else out  # unwritten when not saved
    n = out.numel()
    _gated_gelu_kernel[(triton.cdiv(n, GELU_BLOCK),)](
        gate_up, out, act, n, mlp, SAVE_ACT=save_act, BLOCK=GELU_BLOCK, num_warps=NUM_WARPS
    )
    return out, act if save_act else None
