"""Which implementation of the guided step runs, and how each is called.

Every backend writes into a preallocated ``out``: ``ref`` (the PyTorch definition),
``cpu`` (``ate_fast._C``), ``cuda`` (``ate_fast._C_cuda``) and ``triton``.
:func:`prepare_launch` keeps a validated CPU call's native argument list for a loop that
issues the same step many times (the captured CPU sampler).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ate_fast import native
from ate_fast.ops import backends
from ate_fast.ops.constants import effective_clamp
from ate_fast.ops.guided_step.ref import guided_step_reference
from ate_fast.ops.guided_step.validation import validate, validate_out
from ate_fast.ops.native_abi import PreparedLaunch, current_stream, dtype_code, ptr
from ate_fast.ops.overlap import partially_overlaps_any

SUPPORT = {
    torch.float32: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float64: backends.support(cpu=("cpu",), cuda=("cuda",)),
    torch.float16: backends.support(triton=("cuda",), cuda=("cuda",)),
    torch.bfloat16: backends.support(triton=("cuda",), cuda=("cuda",)),
}
# positions of the tensors a prepared launch re-binds, in native_args' list
_M_AT, _G_AT = 5, 6


def native_args(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp) -> tuple:
    """The argument list of the native ``guided_step`` entry points (CPU and CUDA; CUDA
    appends the device index and stream)."""
    batch = m.shape[0]
    row = m.numel() // batch if batch else 0
    return (
        dtype_code(m.dtype), batch, row, out.data_ptr(), ptr(x), m.data_ptr(), ptr(g),
        ptr(m_prev), ptr(z), ptr(a), b.data_ptr(), ptr(c), ptr(d), ptr(s),
        float(scale), float(clamp),
    )  # fmt: skip


def _into_ref(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp) -> None:
    out.copy_(guided_step_reference(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp))


def _into_cpu(out, *args) -> None:
    native.load("_C").guided_step(*native_args(out, *args))


def _into_cuda(out, *args) -> None:
    device = out.device
    native.load("_C_cuda").guided_step(
        *native_args(out, *args), device.index, current_stream(device)
    )


def _into_triton(out, *args) -> None:
    from ate_fast.ops.guided_step.triton import guided_step_triton_into  # triton is optional

    guided_step_triton_into(out, *args)


IMPLEMENTATIONS = {"ref": _into_ref, "cpu": _into_cpu, "cuda": _into_cuda, "triton": _into_triton}


def selected_backend(m: Tensor) -> str:
    """The backend :func:`ate_fast.guided_step` runs for data like ``m`` (honours
    ``ATE_FAST_BACKEND``)."""
    device_type = "cuda" if m.is_cuda else m.device.type
    key = ("guided_step", device_type, m.dtype, os.environ.get(backends.ENV_VAR))
    backend = backends.SELECTION_CACHE.get(key)
    if backend is None:
        backend = backends.select(device_type, SUPPORT.get(m.dtype, ()), m.dtype)
        backends.SELECTION_CACHE[key] = backend
    return backend


def guided_step_into(out: Tensor, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp,
                     backend: Optional[str] = None, *, fresh_out: bool = False
                     ) -> Tensor:  # fmt: skip
    """Validate, then write the guided step into ``out`` [B, ...] with ``backend``
    (default: :func:`selected_backend`). Returns ``out``.

    ``out`` may be ``x`` or ``m`` (in place); one that partly overlaps an input is
    computed via a temporary. ``fresh_out=True`` (a newly allocated ``out``) skips that
    overlap check."""
    validate(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    validate_out(out, m)
    clamp = effective_clamp(clamp)
    if backend is None:
        backend = selected_backend(m)
    if not fresh_out and partially_overlaps_any(out, (x, m, g, m_prev, z, a, b, c, d, s)):
        # out shares part of its memory with an input: the kernels would read elements
        # they already wrote, so compute into a temporary (an exact alias stays in place).
        tmp = torch.empty_like(out)
        IMPLEMENTATIONS[backend](tmp, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
        return out.copy_(tmp)
    IMPLEMENTATIONS[backend](out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    return out


# where the coefficient rows sit in native_args (slots re-bound by a sample() loop)
_ROW_AT = {"a": 9, "b": 10, "c": 11, "d": 12, "s": 13}


def prepare_launch(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp, *,
                   row_slots: bool = False) -> Optional[PreparedLaunch]:  # fmt: skip
    """The validated CPU kernel call for these arguments, with slots ``m`` and ``g`` (and,
    with ``row_slots``, the coefficient rows ``a``, ``b``, ``c``, ``d``, ``s`` that are
    given) to re-bind per launch; None where the ``cpu`` backend would not run them, or
    where ``out`` partly overlaps an input (the public op then computes via a temporary).

    The caller owns the aliasing contract: every tensor but the slots stays the same
    object (same storage) for as long as it launches the result.
    """
    validate(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    validate_out(out, m)
    clamp = effective_clamp(clamp)
    kernel = native.load("_C")
    if selected_backend(m) != "cpu" or kernel is None:
        return None
    if partially_overlaps_any(out, (x, m, g, m_prev, z, a, b, c, d, s)):
        return None
    args = native_args(out, x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)
    slots = {"m": (_M_AT, m)}
    if g is not None:
        slots["g"] = (_G_AT, g)
    if row_slots:
        rows = {"a": a, "b": b, "c": c, "d": d, "s": s}
        slots.update({k: (_ROW_AT[k], t) for k, t in rows.items() if t is not None})
    return PreparedLaunch(kernel.guided_step, args, slots)
