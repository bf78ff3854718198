"""What the heads' fast paths must know about how they are being run.

The heads leave plain ATen ops for faster ones that torch's machinery cannot see through:
oneDNN's GEMM (:mod:`cpu_gemm`: no backward, no forward-AD or batching rule), in-place
writes into a call's prefix buffers and the Triton epilogues (:mod:`block_epilogues`: no
backward, no batching rule), convolutions as chunk rows (:mod:`chunk_conv`). Each must step
aside where a transform or a graph trace has to see the ATen ops themselves; these
predicates say when.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

# whether a torch.func transform (vmap, grad, vjp, jvp) wraps tensors; a torch without the
# query counts as always
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def forward_ad_active() -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level()``: dual tensors may flow, and an op
    without a forward-AD rule (an ``out=`` write, oneDNN's GEMM) would fail or drop their
    tangents. A torch without the level counts as always."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0


def transforms_active() -> bool:
    """A ``torch.func`` transform or a forward-mode AD level is active: the tensors may be
    batched or carry tangents that only ATen's ops propagate."""
    return _functorch_active() or forward_ad_active()


# inside a sampler call that began outside any export (sampler_call): read per op no more
_OUTSIDE_EXPORT: ContextVar[bool] = ContextVar("ate_fast_outside_export", default=False)


def _exporting_now() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", None)
    # ≈ 1.2 µs (torch.onnx's query imports two modules per call): read once per sampler
    # call inside one (sampler_call), not once per op
    return bool(torch.onnx.is_in_onnx_export() or (exporting is not None and exporting()))


def exporting_graph() -> bool:
    """A graph being traced for export (``torch.export``, the ONNX exporter,
    ``torch.jit.trace``): its weights become constants of the exported graph."""
    if torch.jit.is_tracing():
        return True
    # (a compiler tracing this function never reads the call's flag)
    if not torch.compiler.is_compiling() and _OUTSIDE_EXPORT.get():
        return False
    return _exporting_now()


@contextmanager
def sampler_call() -> Iterator[None]:
    """One sampler call (its K steps): whether ``torch.export`` or the ONNX exporter is
    tracing is read once, at its start — an export wraps a call, it cannot begin inside
    one — and :func:`exporting_graph` (with it :func:`capturing_graph` and
    :func:`opaque_ops_may_run`, asked before each fast op of a step) skips the query
    within. ``torch.jit.trace`` and ``torch.compile`` are still asked per op (each a
    flag read)."""
    if _OUTSIDE_EXPORT.get() or torch.jit.is_tracing() or _exporting_now():
        yield
        return
    token = _OUTSIDE_EXPORT.set(True)
    try:
        yield
    finally:
        _OUTSIDE_EXPORT.reset(token)


def autocast_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a type autocast has no mode
    for, e.g. ``meta``: torch raises there)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def capturing_graph() -> bool:
    """A graph capture that must see ATen's ops themselves (``torch.compile``,
    ``torch.export``, the ONNX exporter, ``torch.jit.trace``)."""
    return torch.compiler.is_compiling() or exporting_graph()


def opaque_ops_may_run(*tensors: Tensor) -> bool:
    """Whether an op torch cannot see through may run on ``tensors``: no graph capture, no
    transform, plain ``Tensor`` / ``Parameter`` objects (no fake or functional subclass),
    and no autograd record (no tensor requires grad while grad mode is on)."""
    if capturing_graph() or transforms_active():
        return False
    if any(type(t) not in (Tensor, nn.Parameter) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
