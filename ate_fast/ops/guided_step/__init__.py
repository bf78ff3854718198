"""The fused guided step: every sampler update and steer correction in ate_fast.

    out = a·x + b·(m + λ·clip(c·g, −κ, κ)) + d·m_prev + s·z

Shapes: ``x, m, g, m_prev, z`` are ``[B, H, D]`` (any ``[B, ...]`` works: the op is
elementwise within a batch row); ``a, b, c, d, s`` are ``[B]`` so that each sample can
sit at its own timestep; λ (``scale``) and κ (``clamp``) are scalars. Every
tensor but ``m`` is optional and an absent one drops its term. How the samplers use it
(``m`` is the model output, ``g`` the guidance gradient, ``c`` the parameterisation's
guidance coefficient from ATE_METHOD.md):

============================  ==========================================================
DDIM (η ≥ 0), ε-prediction    x_prev = a·x + b·ε̂ + s·z,  a = √(ᾱ'/ᾱ),
                              b = √(1−ᾱ'−σ²) − √(ᾱ'(1−ᾱ)/ᾱ),  s = σ
DDPM posterior                x_prev = a·x + b·ε̂ + s·z (a, b from the posterior mean)
DPM-Solver++(2M)              first x̂0 = a·x + b·ε̂ (conversion, guidance applied here),
                              then x' = a·x + b·x̂0 + d·x̂0_prev (the multistep update)
flow Euler (openpi)           x' = x + Δt·v̂  (a = 1, b = Δt < 0)
steer correction (training)   pred + λ·clip(c·g, −κ, κ)    (x absent, b = 1)
============================  ==========================================================

where ε̂ = m + λ·clip(c·g, −κ, κ) is the guided model output.

Backends: ``ref`` (PyTorch), ``cpu`` (C++/OpenMP; float32, float64), ``triton``
(float32, float16, bfloat16), ``cuda`` (float32, float64, float16, bfloat16). Half
types compute in float32, float64 in float64. The op is registered as
``torch.ops.ate_fast.guided_step`` (functional, differentiable) and
``torch.ops.ate_fast.guided_step_out`` (writes into ``out``; CUDA-graph friendly).

Layout: :mod:`.ref` (the definition), :mod:`.validation`, :mod:`.dispatch` (backends,
native arguments, prepared launches), :mod:`.autograd`, :mod:`.triton`; this module
registers the op and holds the public function.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.ops.constants import compute_dtype, effective_clamp
from ate_fast.ops.guided_step.autograd import backward, setup_context
from ate_fast.ops.guided_step.dispatch import guided_step_into, prepare_launch, selected_backend
from ate_fast.ops.guided_step.ref import guided_step_reference
from ate_fast.ops.guided_step.validation import check_data, validate

Coefficient = Union[Tensor, float]

__all__ = [
    "Coefficient",
    "guided_step",
    "guided_step_into",
    "guided_step_reference",
    "prepare_launch",
    "selected_backend",
]

# ---------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------
_ARGS = (
    "Tensor? x, Tensor m, Tensor? a, Tensor b, Tensor? g, Tensor? c, Tensor? m_prev, "
    "Tensor? d, Tensor? z, Tensor? s, float scale, float clamp"
)


@torch.library.custom_op("ate_fast::guided_step", mutates_args=(), schema=f"({_ARGS}) -> Tensor")
def _guided_step_op(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
    out = torch.empty_like(m, memory_format=torch.contiguous_format)
    return guided_step_into(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp, fresh_out=True)


@_guided_step_op.register_fake
def _(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
    validate(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    return torch.empty_like(m, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "ate_fast::guided_step_out", mutates_args=("out",), schema=f"(Tensor(a!) out, {_ARGS}) -> ()"
)
def _guided_step_out_op(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
    guided_step_into(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)


@_guided_step_out_op.register_fake
def _(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
    validate(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    check_data("out", out, m)


_guided_step_op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------
def _coefficient(name: str, value: Optional[Coefficient], m: Tensor) -> Optional[Tensor]:
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full(
            (m.shape[0],), float(value), dtype=compute_dtype(m.dtype), device=m.device
        )
    raise ArgumentTypeError(
        f"guided_step: {name} must be a [B] tensor or a float, got {type(value).__name__}"
    )


def _plain(*tensors: Optional[Tensor]) -> bool:
    """True when the call can skip the torch.library dispatcher: eager, no autograd,
    no tensor subclasses (fake / functional tensors take the registered op)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or (grad and t.requires_grad):
            return False
    return True


def guided_step(
    x: Optional[Tensor],
    m: Tensor,
    *,
    a: Optional[Coefficient] = None,
    b: Coefficient = 1.0,
    g: Optional[Tensor] = None,
    c: Optional[Coefficient] = None,
    scale: float = 1.0,
    clamp: float = math.inf,
    m_prev: Optional[Tensor] = None,
    d: Optional[Coefficient] = None,
    z: Optional[Tensor] = None,
    s: Optional[Coefficient] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``out = a·x + b·(m + scale·clip(c·g, −clamp, clamp)) + d·m_prev + s·z``, fused.

    Args:
        x: ``[B, H, D]`` current sample, or None (drops ``a·x``; then ``a`` must be None).
        m: ``[B, H, D]`` model output (ε, x0, v or velocity); required.
        a, b, c, d, s: ``[B]`` per-sample coefficients in the compute dtype (float64 for
            float64 data, float32 otherwise) or Python floats (broadcast to ``[B]``).
            ``a`` is required with ``x``, ``d`` with ``m_prev``, ``s`` with ``z``; ``c``
            defaults to 1 when ``g`` is given.
        g: ``[B, H, D]`` guidance gradient, or None.
        scale: λ, the guidance scale (finite).
        clamp: κ ≥ 0, the bound applied to ``c·g`` element-wise; ``inf`` (or any value
            ≥ float32's maximum, on every backend) disables it.
        m_prev: ``[B, H, D]`` previous model output (multistep solvers), or None.
        z: ``[B, H, D]`` fresh noise, or None.
        out: optional ``[B, H, D]`` destination (may be ``x`` or ``m`` for an in-place
            update); not differentiable.

    Returns:
        ``[B, H, D]`` tensor of ``m``'s dtype. All tensors must share shape, dtype,
        device and be contiguous; violations raise ``ValueError``/``TypeError`` naming
        the argument. Differentiable with respect to every tensor argument.
    """
    if not isinstance(m, Tensor):
        raise ArgumentTypeError(f"guided_step: m must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim < 1:
        raise InvalidArgumentError(
            "guided_step: m must have a batch dimension ([B, H, D]), got a scalar"
        )
    if g is not None and c is None:
        c = 1.0
    if not (isinstance(b, Tensor) and (a is None or isinstance(a, Tensor))):
        a, b = _coefficient("a", a, m), _coefficient("b", b, m)
    if not (
        (c is None or isinstance(c, Tensor)) and (d is None or isinstance(d, Tensor))
        and (s is None or isinstance(s, Tensor))
    ):  # fmt: skip
        c, d, s = _coefficient("c", c, m), _coefficient("d", d, m), _coefficient("s", s, m)
    args = (x, m, a, b, g, c, m_prev, d, z, s, float(scale), effective_clamp(clamp))
    if out is not None:
        if not isinstance(out, Tensor):
            raise ArgumentTypeError(
                f"guided_step: out must be a torch.Tensor or None, got {type(out).__name__}"
            )
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
            raise RuntimeError("guided_step: out= does not support autograd; call it without out")
        if _plain(out, *args[:10]):
            guided_step_into(out, *args)
        else:
            torch.ops.ate_fast.guided_step_out(out, *args)
        return out
    if _plain(*args[:10]):
        return guided_step_into(torch.empty_like(m), *args, fresh_out=True)
    return torch.ops.ate_fast.guided_step(*args)
