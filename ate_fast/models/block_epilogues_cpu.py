"""The flow-transformer MLP's gated GELU and its backward as C++ CPU kernels.

:func:`ate_fast.models.block_epilogues.gated_gelu` and
:func:`ate_fast.models.flow_transformer_vjp.gelu_gate_backward` call these where the
``native`` path runs (:func:`ate_fast.models.block_epilogues.use_native`: the CPU's
default, float32 tensors): one pass over the rows each (``ate_fast._C``; the torch ops are
``gelu`` + a product forward, a product + ``gelu_backward`` + a product + a concatenation
backward). ATen's float32 tanh-GELU costs ≈ 2 ns per element on one AVX-512 core, its
``tanh`` being the slow part; the kernels compute ``gelu_tanh(g) = g·σ(u)``,
``u = 2√(2/π)(g + 0.044715 g³)`` (the tanh form's ``0.5·(1 + tanh(u/2))`` is ``σ(u)``),
``σ`` through a short exp polynomial (≈ 1 ulp), vectorised for the CPU they run on
(AVX-512, AVX2 or the x86-64 baseline), on ``torch.get_num_threads()`` threads for a
large call. They round differently from ATen (a few float32
ulps, tested against float64), the same way in a forward with and without the saved GELU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ate_fast import native
from ate_fast.errors import InvalidArgumentError

_FLOAT32 = 0  # the launchers' dtype code (csrc/include/ate_fast/constants.h)


def _kernels():
    module = native.load("_C")
    if module is None:  # use_native checked it: only a direct call gets here
        raise RuntimeError(f"ate_fast._C is not available: {native.reason('_C')}")
    return module


def _check(name: str, t: Tensor) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise InvalidArgumentError(
            f"{name}: expected a float32 CPU tensor, got {t.dtype} on {t.device}"
        )


def gated_gelu(gate_up: Tensor, save_act: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(gelu_tanh(gate)·up, gelu_tanh(gate) if save_act else None)`` [.., F] for
    ``gate_up`` [.., 2F] (float32, CPU) split as ``gate, up``."""
    _check("gate_up", gate_up)
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
            _FLOAT32, rows, width, 2 * width, base, base + width * size, out.data_ptr(),
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
    as the forward kept it; float32 CPU tensors of one shape."""
    for name, t in (("dm", dm), ("gate", gate), ("up", up), ("act", act)):
        _check(name, t)
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
        _FLOAT32, rows, width, stride, dm_rows.data_ptr(), g.data_ptr(), u.data_ptr(),
        act_rows.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out
