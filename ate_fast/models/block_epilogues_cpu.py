"""The flow-transformer block's epilogues as C++ CPU kernels: the MLP's gated GELU and its
backward, RMSNorm, the rotary q/k/v epilogue, and attention's softmax backward.

:func:`ate_fast.models.block_epilogues.gated_gelu` and
:func:`ate_fast.models.flow_transformer_vjp.gelu_gate_backward` call these where the
``native`` path runs (:func:`ate_fast.models.block_epilogues.use_native`: the CPU's
default, float32 or bfloat16 tensors): one pass over the rows each (``ate_fast._C``; the
torch ops are ``gelu`` + a product forward, a product + ``gelu_backward`` + a product + a
concatenation backward). ATen's float32 tanh-GELU costs ≈ 2 ns per element on one AVX-512 core, its
``tanh`` being the slow part; the kernels compute ``gelu_tanh(g) = g·σ(u)``,
``u = 2√(2/π)(g + 0.044715 g³)`` (the tanh form's ``0.5·(1 + tanh(u/2))`` is ``σ(u)``),
``σ`` through a short exp polynomial (≈ 1 ulp), vectorised for the CPU they run on
(AVX-512, AVX2 or the x86-64 baseline), on ``torch.get_num_threads()`` threads for a
large call. They round differently from ATen (a few float32
ulps, tested against float64), the same way in a forward with and without the saved GELU.

:func:`rms_norm` (``torch.nn.RMSNorm`` over the last dim) and :func:`rotate_qkv` (the
queries and keys rotated, the values copied into attention's layout) replace five and
six to twelve ATen ops each: on one core of a batch-1 step each ATen op costs a few
microseconds of dispatch and allocation — more right after a GEMM has streamed its weights
through the caches — against a fraction of a microsecond of arithmetic. :func:`softmax_backward`
and :func:`softmax_grad` (the input-VJP through attention: the probabilities and the scores'
gradient) likewise replace seven and four.

Every kernel also takes bfloat16 (:data:`NATIVE_DTYPES`; every tensor of a call in one
dtype): a row's values are widened to float32 (in chunks of 256 on the stack; the softmax's
whole rows into a thread's buffer), computed as the float32 kernel computes them and each
output rounded once to nearest even — the GELU, its backward, the rotation, its undoing and
the softmax bit for bit the float32 kernel's result on the widened inputs, rounded (ATen's
bf16 ops round each intermediate); the norms sum their rows chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ate_fast import native
from ate_fast.errors import InvalidArgumentError
from ate_fast.ops.constants import DTYPE_CODES

# the dtypes every kernel here takes (all tensors of a call in one): bfloat16 is loaded as
# float32, computed in float32 and each output rounded once
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _kernels():
    module = native.load("_C")
    if module is None:  # use_native checked it: only a direct call gets here
        raise RuntimeError(f"ate_fast._C is not available: {native.reason('_C')}")
    return module


def _check(name: str, t: Tensor, dtype: torch.dtype) -> None:
    """``t`` a CPU tensor of ``dtype`` (the call's first tensor's, :func:`_dtype_code`)."""
    if t.device.type != "cpu" or t.dtype != dtype:
        expected = str(dtype).removeprefix("torch.")
        raise InvalidArgumentError(
            f"{name}: expected a {expected} CPU tensor (the call's dtype), got {t.dtype} on "
            f"{t.device}"
        )


def _dtype_code(name: str, t: Tensor) -> int:
    """The launchers' dtype code of a call's first tensor ``t``, float32 or bfloat16 (the
    call's other tensors must have its dtype)."""
    if t.device.type != "cpu" or t.dtype not in NATIVE_DTYPES:
        raise InvalidArgumentError(
            f"{name}: expected a float32 or bfloat16 CPU tensor, got {t.dtype} on {t.device}"
        )
    return DTYPE_CODES[t.dtype]


def gated_gelu(gate_up: Tensor, save_act: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(gelu_tanh(gate)·up, gelu_tanh(gate) if save_act else None)`` [.., F] for
    ``gate_up`` [.., 2F] (float32 or bfloat16, CPU) split as ``gate, up``."""
    code = _dtype_code("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise InvalidArgumentError(
            f"gate_up: expected [.., 2F] (an even last dim), got {tuple(gate_up.shape)}"
        )
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], width)
    out = gate_up.new_empty(shape)
    act = gate_up.new_empty(shape) if save_act else None
    rows = out.numel() // width if width else 0
    if rows:
        base, size = gate_up.data_ptr(), gate_up.element_size()
        _kernels().gated_gelu(
            code, rows, width, 2 * width, base, base + width * size, out.data_ptr(),
            act.data_ptr() if act is not None else 0, torch.get_num_threads(),
        )  # fmt: skip
    return out, act


def _rows(t: Tensor, width: int) -> Tensor:
    """``t`` [.., F] as rows [R, F] one stride (≥ F) apart with unit column stride (a view
    where possible, e.g. a half of a contiguous [.., 2F])."""
    rows = t.reshape(-1, width)
    apart = rows.shape[0] == 1 or rows.stride(0) >= width
    return rows if rows.stride(-1) == 1 and apart else rows.contiguous()


def gelu_gate_backward(dm: Tensor, gate: Tensor, up: Tensor, act: Tensor) -> Tensor:
    """The gate/up projection's output gradient ``[dm·up·gelu_tanh′(gate), dm·act]``
    [.., 2F] from the gated product's gradient ``dm`` [.., F], the forward's ``gate`` and
    ``up`` [.., F] (e.g. the halves of its [.., 2F] output) and ``act`` = gelu_tanh(gate)
    as the forward kept it; CPU tensors of one shape and dtype (float32 or bfloat16)."""
    code = _dtype_code("dm", dm)
    for name, t in (("dm", dm), ("gate", gate), ("up", up), ("act", act)):
        _check(name, t, dm.dtype)
        if t.shape != dm.shape or t.dim() == 0:
            raise InvalidArgumentError(
                f"{name}: expected [.., F] of dm's shape {tuple(dm.shape)}, got {tuple(t.shape)}"
            )
    width = dm.shape[-1]
    out = dm.new_empty((*dm.shape[:-1], 2 * width))
    rows = dm.numel() // width if width else 0
    if not rows:
        return out
    g, u = _rows(gate, width), _rows(up, width)
    if g.stride() != u.stride():
        g, u = g.contiguous(), u.contiguous()
    stride = g.stride(0) if rows > 1 else width
    dm_rows, act_rows = dm.reshape(rows, width).contiguous(), act.reshape(rows, width).contiguous()
    _kernels().gelu_gate_backward(
        code, rows, width, stride, dm_rows.data_ptr(), g.data_ptr(), u.data_ptr(),
        act_rows.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _norm_weight(weight: Optional[Tensor], width: int, dtype: torch.dtype) -> Optional[Tensor]:
    """A norm's ``weight`` [width] checked (a CPU tensor of ``dtype``, its shape),
    contiguous; None stays."""
    if weight is None:
        return None
    _check("weight", weight, dtype)
    if weight.shape != (width,):
        raise InvalidArgumentError(
            f"weight: expected [{width}] (x's last dim), got {tuple(weight.shape)}"
        )
    return weight.contiguous()


def _check_eps(eps: float) -> None:
    if not eps >= 0.0:
        raise InvalidArgumentError(f"eps: expected a number >= 0, got {eps!r}")


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``torch.nn.functional.rms_norm(x, (width,), weight, eps)`` [.., width] of ``x``
    [.., width] (float32 or bfloat16, CPU; ``weight`` [width] of x's dtype, or None): each
    row times ``1/√(mean(row²) + eps)``, then the weight, rounded as ATen's float32 op
    rounds each step (the sum of squares in another order); bfloat16 computed in float32,
    the output rounded once."""
    code = _dtype_code("x", x)
    if x.dim() == 0:
        raise InvalidArgumentError("x: expected [.., width], got a 0-d tensor")
    width = x.shape[-1]
    weight = _norm_weight(weight, width, x.dtype)
    _check_eps(eps)
    out = torch.empty(x.shape, dtype=x.dtype)
    rows = x.numel() // width if width else 0
    if rows:
        x_rows = _rows(x, width)
        stride = x_rows.stride(0) if rows > 1 else width
        _kernels().rms_norm(
            code, rows, width, stride, x_rows.data_ptr(),
            weight.data_ptr() if weight is not None else 0, out.data_ptr(), float(eps),
            torch.get_num_threads(),
        )  # fmt: skip
    return out


def _token_rows(t: Tensor) -> Tensor:
    """``t`` [B, H, C] with unit column stride (a view where it has one, e.g. a column
    range of a fused projection's output)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(cos: Tensor, sin: Tensor, horizon: int, hd: int) -> tuple[Tensor, Tensor, int]:
    """The last ``horizon`` rows of the rotary tables ``cos``, ``sin`` [N, hd] or
    [B, 1, N, hd] (N ≥ horizon), rows hd apart with unit column stride, and their batch
    stride (0 for shared tables)."""
    if cos.shape != sin.shape or cos.shape[-1] != hd or cos.shape[-2] < horizon:
        raise InvalidArgumentError(
            f"cos, sin: expected [≥ {horizon}, {hd}] or [B, 1, ≥ {horizon}, {hd}], got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    rows = []
    for table in (cos, sin):
        table = table[..., -horizon:, :]
        if table.stride(-1) != 1 or table.stride(-2) != hd:
            table = table.contiguous()
        rows.append(table)
    if rows[0].dim() == 4 and rows[0].stride() != rows[1].stride():
        rows = [t.contiguous() for t in rows]
    return rows[0], rows[1], (rows[0].stride(0) if rows[0].dim() == 4 else 0)


def rotate_qkv(
    q_lin: Tensor, kv_lin: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int,
    out: Optional[tuple[Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(q, k, v)`` of :func:`ate_fast.models.block_epilogues.rotate_qkv` without a
    prefix in front (``out``: the call's buffers, the action rows written behind the
    prefix's): ``q_lin`` [B, H, heads·hd], ``kv_lin`` [B, H, 2·kv_heads·hd] (CPU, unit
    column stride; float32 or bfloat16, every tensor in q_lin's dtype), ``cos``, ``sin``
    [≥ H, hd] or [B, 1, ≥ H, hd] (their last H rows: the action tokens' positions);
    ``q`` [B, kv_heads, H·g, hd] (g = heads / kv_heads), ``k``, ``v`` [B, kv_heads, H, hd] or
    ``out``."""
    code = _dtype_code("q_lin", q_lin)
    for name, t in (("kv_lin", kv_lin), ("cos", cos), ("sin", sin)):
        _check(name, t, q_lin.dtype)
    if q_lin.dim() != 3 or kv_lin.shape[:2] != q_lin.shape[:2]:
        raise InvalidArgumentError(
            f"q_lin, kv_lin: expected [B, H, ·] each, got {tuple(q_lin.shape)} and "
            f"{tuple(kv_lin.shape)}"
        )
    batch, horizon, width = q_lin.shape
    if heads < 1 or kv_heads < 1 or heads % kv_heads or width % heads:
        raise InvalidArgumentError(
            f"heads, kv_heads: expected kv_heads dividing heads and heads dividing q_lin's "
            f"{width} columns, got {heads}, {kv_heads}"
        )
    hd = width // heads
    if kv_lin.shape[-1] != 2 * kv_heads * hd or hd % 2:
        raise InvalidArgumentError(
            f"kv_lin: expected [B, H, {2 * kv_heads * hd}] (keys' and values' heads of an "
            f"even head dim {hd}), got {tuple(kv_lin.shape)}"
        )
    q_lin, kv_lin = _token_rows(q_lin), _token_rows(kv_lin)
    cos, sin, table_stride = _tables(cos, sin, horizon, hd)
    group = heads // kv_heads
    q = q_lin.new_empty((batch, kv_heads, horizon * group, hd))
    if out is None:
        k, v = (q_lin.new_empty((batch, kv_heads, horizon, hd)) for _ in range(2))
        k_rows, v_rows = k, v
    else:
        k, v = out
        k_rows, v_rows = k[:, :, -horizon:], v[:, :, -horizon:]
        layout = k.stride() == v.stride() and k.stride()[2:] == (hd, 1)
        if not layout or k.shape[:2] != (batch, kv_heads):
            raise InvalidArgumentError(
                f"out: expected two buffers [{batch}, {kv_heads}, L + {horizon}, {hd}] of one "
                f"layout, rows {hd} apart, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        for t in out:
            _check("out", t, q_lin.dtype)
    if batch and horizon:
        _kernels().rotate_qkv(
            code, [batch, horizon, heads, kv_heads, hd], q_lin.data_ptr(),
            list(q_lin.stride()[:2]), kv_lin.data_ptr(), list(kv_lin.stride()[:2]),
            cos.data_ptr(), sin.data_ptr(), table_stride, q.data_ptr(), k_rows.data_ptr(),
            v_rows.data_ptr(), list(k_rows.stride()[:2]), torch.get_num_threads(),
        )  # fmt: skip
    return q, k, v


def rms_norm_vjp(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], eps: float,
    residual: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """``residual + (∂ rms_norm(x)/∂x)ᵀ grad`` [.., width] (``residual`` None: 0) for
    ``torch.nn.functional.rms_norm(x, (width,), weight, eps)``: per row
    ``ρ·(gw − x̂·mean(gw·x̂))``, ``ρ = 1/√(mean(x²) + eps)``, ``x̂ = x·ρ``,
    ``gw = grad·weight`` (``weight`` None: ``grad`` itself); CPU tensors of one dtype
    (float32 or bfloat16)."""
    code = _dtype_code("grad", grad)
    _check("x", x, grad.dtype)
    if grad.shape != x.shape or x.dim() == 0:
        raise InvalidArgumentError(
            f"grad: expected x's shape {tuple(x.shape)} (.., width), got {tuple(grad.shape)}"
        )
    width = x.shape[-1]
    weight = _norm_weight(weight, width, x.dtype)
    if residual is not None:
        _check("residual", residual, x.dtype)
        if residual.shape != x.shape:
            raise InvalidArgumentError(
                f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
            )
        residual = residual.contiguous()
    _check_eps(eps)
    grad, x = grad.contiguous(), x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    rows = x.numel() // width if width else 0
    if rows:
        _kernels().rms_norm_vjp(
            code, rows, width, grad.data_ptr(), x.data_ptr(),
            weight.data_ptr() if weight is not None else 0,
            residual.data_ptr() if residual is not None else 0, out.data_ptr(), float(eps),
            torch.get_num_threads(),
        )  # fmt: skip
    return out


def unrotate_pack(
    dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor, fused: bool = False
) -> tuple[Tensor, ...]:
    """The q and kv projections' output gradients from attention's: ``dq``
    [B, kv_heads, H·g, hd] (the queries' grouped layout, :func:`rotate_qkv`), ``dk``, ``dv``
    [B, kv_heads, H, hd]; the rotation undone on dq and dk with the tables ``cos``, ``sin``
    [≥ H, hd] or [B, 1, ≥ H, hd] (their last H rows). Returns ``(dq [B, H, heads·hd],
    [dk | dv] [B, H, 2·kv_heads·hd])``, or with ``fused`` the one ``[dq | dk | dv]``
    [B, H, (heads + 2·kv_heads)·hd] (the fused projection's); CPU tensors of one dtype
    (float32 or bfloat16)."""
    code = _dtype_code("dq", dq)
    for name, t in (("dk", dk), ("dv", dv), ("cos", cos), ("sin", sin)):
        _check(name, t, dq.dtype)
    if dk.dim() != 4 or dv.shape != dk.shape or dq.dim() != 4 or dq.shape[:2] != dk.shape[:2]:
        raise InvalidArgumentError(
            f"dq, dk, dv: expected [B, kv_heads, H·g, hd] and two [B, kv_heads, H, hd], got "
            f"{tuple(dq.shape)}, {tuple(dk.shape)}, {tuple(dv.shape)}"
        )
    batch, kv_heads, horizon, hd = dk.shape
    rows = dq.shape[2]
    if dq.shape[3] != hd or horizon == 0 or rows % horizon or hd % 2:
        raise InvalidArgumentError(
            f"dq: expected [{batch}, {kv_heads}, {horizon}·g, {hd}] (an even head dim), got "
            f"{tuple(dq.shape)}"
        )
    heads = kv_heads * (rows // horizon)
    cos, sin, table_stride = _tables(cos, sin, horizon, hd)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    q_width, kv_width = heads * hd, 2 * kv_heads * hd
    if fused:
        out = dq.new_empty((batch, horizon, q_width + kv_width))
        q_out, kv_out = out[..., :q_width], out[..., q_width:]
    else:
        q_out = dq.new_empty((batch, horizon, q_width))
        kv_out = dq.new_empty((batch, horizon, kv_width))
    if batch:
        _kernels().unrotate_pack(
            code, [batch, horizon, heads, kv_heads, hd], dq.data_ptr(), dk.data_ptr(),
            dv.data_ptr(), cos.data_ptr(), sin.data_ptr(), table_stride, q_out.data_ptr(),
            q_out.stride(1), kv_out.data_ptr(), kv_out.stride(1), torch.get_num_threads(),
        )  # fmt: skip
    return (out,) if fused else (q_out, kv_out)


def _output_rows(name: str, t: Tensor) -> Tensor:
    """An output ``t`` [..., n] as a view [R, n] of rows one stride apart, unit column
    stride (the kernel writes through it)."""
    n = t.shape[-1]
    try:
        rows = t.view(-1, n)
    except RuntimeError:
        rows = None
    if rows is None or rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < n):
        raise InvalidArgumentError(
            f"{name}: expected rows one stride apart with unit column stride (viewable as "
            f"[R, {n}]), got strides {t.stride()}"
        )
    return rows


def _softmax_call(
    scores: Optional[Tensor], p: Tensor, dp: Tensor, ds: Tensor, scale: float
) -> None:
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"scale: expected a finite number, got {scale!r}")
    if dp.dim() == 0:
        raise InvalidArgumentError("dp: expected [..., n] score rows, got a 0-dim tensor")
    shape = dp.shape
    named = {"dp": dp, "p": p, "ds_out": ds, **({} if scores is None else {"scores": scores})}
    code = _dtype_code("dp", dp)
    for name, t in named.items():
        _check(name, t, dp.dtype)
        if t.shape != shape:
            raise InvalidArgumentError(
                f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}"
            )
    if dp.numel() == 0:
        return
    n = shape[-1]
    dp_rows, ds_rows = _rows(dp, n), _output_rows("ds_out", ds)
    # p: written from the scores, else only read (a copy of it will do)
    p_rows = _rows(p, n) if scores is None else _output_rows("p", p)
    s_rows = None if scores is None else _rows(scores, n)
    _kernels().softmax_backward(
        code, dp_rows.shape[0], n, 0 if s_rows is None else s_rows.data_ptr(),
        0 if s_rows is None else s_rows.stride(0), p_rows.data_ptr(), p_rows.stride(0),
        dp_rows.data_ptr(), dp_rows.stride(0), ds_rows.data_ptr(), ds_rows.stride(0),
        float(scale), torch.get_num_threads(),
    )  # fmt: skip


def softmax_backward(
    scores: Tensor, dp: Tensor, scale: float, p_out: Optional[Tensor] = None,
    ds_out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(p, ds)``: ``p = softmax(scores·scale)`` and ``ds = p ⊙ (dp − rowsum(dp ⊙ p))·scale``
    [..., n] (a score of −inf, a masked key, gets probability exactly 0); written into
    ``p_out`` / ``ds_out`` where given (rows one stride apart, e.g.
    :func:`~ate_fast.models.gemm_alignment.aligned_rows`), else new tensors; CPU tensors
    of one dtype (float32 or bfloat16)."""
    p = torch.empty_like(dp, memory_format=torch.contiguous_format) if p_out is None else p_out
    ds = torch.empty_like(p) if ds_out is None else ds_out
    _softmax_call(scores, p, dp, ds, scale)
    return p, ds


def softmax_grad(p: Tensor, dp: Tensor, scale: float, ds_out: Optional[Tensor] = None) -> Tensor:
    """``ds = p ⊙ (dp − rowsum(dp ⊙ p))·scale`` [..., n] from the probabilities ``p`` the
    forward kept, into ``ds_out`` where given; CPU tensors of one dtype (float32 or
    bfloat16)."""
    ds = torch.empty_like(dp, memory_format=torch.contiguous_format) if ds_out is None else ds_out
    _softmax_call(None, p, dp, ds, scale)
    return ds
