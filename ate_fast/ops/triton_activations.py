"""The element-wise activations the package's Triton kernels share, and their derivatives
(imported by the kernel modules only: importing triton costs a second).

Codes are :data:`~ate_fast.ops.constants.ACTIVATIONS` indices (``gelu`` exact (erf),
``silu``, ``relu``, ``tanh``), the native kernels' ``Activation`` codes; :data:`NONE`
(no activation) is for kernels where one is optional (the few-row GEMM's epilogue).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ate_fast.ops.constants import ACTIVATIONS, NO_ACTIVATION

NONE = NO_ACTIVATION  # no activation (an optional epilogue's default)
GELU = ACTIVATIONS.index("gelu")
SILU = ACTIVATIONS.index("silu")
RELU = ACTIVATIONS.index("relu")
TANH = ACTIVATIONS.index("tanh")
_GELU = tl.constexpr(GELU)
_SILU = tl.constexpr(SILU)
_RELU = tl.constexpr(RELU)
_TANH = tl.constexpr(TANH)


@triton.jit
def tanh(u):
    """tanh(|u|) = (1 − e)/(1 + e), e = exp(−2|u|) ∈ (0, 1]: no overflow, sign restored."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def sigmoid(u):
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def activation(u, ACT: tl.constexpr):
    """``act(u)`` for the code ``ACT`` (``u`` itself for :data:`NONE`)."""
    if ACT == _GELU:  # exact (erf) GELU
        y = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    elif ACT == _SILU:
        y = u * sigmoid(u)
    elif ACT == _RELU:
        y = tl.where(u < 0, 0.0, u)  # keeps NaN like torch.relu
    elif ACT == _TANH:
        y = tanh(u)
    else:
        y = u
    return y


@triton.jit
def activation_grad(u, ACT: tl.constexpr):
    """``act'(u)`` for the code ``ACT`` (ReLU's is 0 at 0, as torch's)."""
    if ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        d = cdf + u * pdf
    elif ACT == _SILU:
        s = sigmoid(u)
        d = s * (1.0 + u * (1.0 - s))
    elif ACT == _RELU:
        d = tl.where(u > 0, 1.0, 0.0).to(u.dtype)
    elif ACT == _TANH:
        t = tanh(u)
        d = 1.0 - t * t
    else:
        d = tl.full(u.shape, 1.0, u.dtype)
    return d


@triton.jit
def times_activation_grad(g, u, ACT: tl.constexpr):
    """``g ⊙ act'(u)``: an activation's input-VJP; ReLU's as torch's ``threshold_backward``
    (0 where ``u ≤ 0``, whatever ``g`` holds there, NaN included)."""
    if ACT == _RELU:
        d = tl.where(u > 0, g, 0.0)
    else:
        d = g * activation_grad(u, ACT)
    return d


_NONE = tl.constexpr(NONE)


@triton.jit
def activation_epilogue(acc, pre_ptr, at, ok, ACT: tl.constexpr, GRAD: tl.constexpr):
    """A GEMM epilogue's activation of its accumulator ``acc`` (elements ``at`` of the
    output, ``ok`` in bounds): ``GRAD``, the input-VJP ``acc ⊙ act'(pre[at])`` from the
    forward's saved pre-activation; else, with an activation, ``pre[at] = acc`` saved (in
    ``pre_ptr``'s type, the compute type) and ``act(acc)`` returned; :data:`NONE`:
    ``acc``."""
    if GRAD:
        acc = times_activation_grad(acc, tl.load(pre_ptr + at, mask=ok, other=0.0), ACT)
    elif ACT != _NONE:
        tl.store(pre_ptr + at, acc, mask=ok)
        acc = activation(acc, ACT)
    return acc
