"""How a sampling loop issues its fused guided steps (:func:`ate_fast.ops.guided_step`).

:class:`Launch` calls the public op: validation, backend dispatch, then the kernel. It
is what ``sample()`` uses, and what a CUDA graph captures.

On the CPU there is no graph to capture, and the op's per-call validation and
dispatch (~20 µs) cost as much as the kernel on a small action chunk many times over.
A captured CPU loop therefore records its launches once (:class:`RecordingLaunch`:
every call runs through the public, validated op) and then replays them
(:class:`ReplayLaunch`): the buffers and coefficient rows are the same objects on every
replay, so each launch only checks the two tensors that change between calls — the
model output ``m`` and the guidance gradient ``g`` — and calls the op's CPU kernel with
the argument list prepared at recording time.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ate_fast import native
from ate_fast.ops import guided_step, selected_backend
from ate_fast.ops.guided_step import _native_args


class Launch:
    """``out = a·x + b·(m + lam·clamp(c·g, −kappa, kappa)) + d·m_prev + s·z`` through the
    public op; ``lam``/``kappa`` are the guidance's scale and clamp for the whole run."""

    def __init__(self, lam: float = 1.0, kappa: float = math.inf) -> None:
        self.lam = lam
        self.kappa = kappa

    def __call__(
        self,
        out: Tensor,
        x: Optional[Tensor],
        m: Tensor,
        a: Optional[Tensor],
        b: Tensor,
        g: Optional[Tensor] = None,
        c: Optional[Tensor] = None,
        m_prev: Optional[Tensor] = None,
        d: Optional[Tensor] = None,
        z: Optional[Tensor] = None,
        s: Optional[Tensor] = None,
    ) -> Tensor:
        if g is None:
            c = None  # unguided: the correction term drops out
        return guided_step(
            x, m, a=a, b=b, g=g, c=c, lam=self.lam, kappa=self.kappa,
            m_prev=m_prev, d=d, z=z, s=s, out=out,
        )  # fmt: skip


class _PreparedCall:
    """One recorded CPU launch: the kernel's argument list with ``m`` and ``g`` to fill."""

    def __init__(self, kernel: Callable, args: tuple, m_probe: Tensor, g_probe: Optional[Tensor]):
        self.kernel = kernel
        self.args = list(args)
        self.out: Optional[Tensor] = None
        # The list was built with fresh probe tensors standing in for m and g, so their
        # pointers are unique in it (a model may return a tensor aliasing x or out).
        self.m_at = self.args.index(m_probe.data_ptr())
        self.g_at = self.args.index(g_probe.data_ptr()) if g_probe is not None else -1
        self.shape, self.dtype, self.device = m_probe.shape, m_probe.dtype, m_probe.device

    def matches(self, t: Tensor) -> bool:
        return (
            t.shape == self.shape
            and t.dtype == self.dtype
            and t.device == self.device
            and t.is_contiguous()
        )

    def __call__(self, m: Tensor, g: Optional[Tensor]) -> None:
        self.args[self.m_at] = m.data_ptr()
        if self.g_at >= 0:
            self.args[self.g_at] = g.data_ptr()
        self.kernel(*self.args)


class RecordingLaunch(Launch):
    """A :class:`Launch` that also records each call for :class:`ReplayLaunch`."""

    def __init__(self, lam: float = 1.0, kappa: float = math.inf) -> None:
        super().__init__(lam, kappa)
        self.calls: list[Optional[_PreparedCall]] = []

    def __call__(self, out, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None):
        result = super().__call__(out, x, m, a, b, g, c, m_prev, d, z, s)
        if g is None:
            c = None
        kernel = native.load("_C")
        if selected_backend(m) == "cpu" and kernel is not None:
            m_probe = torch.empty_like(m)
            g_probe = None if g is None else torch.empty_like(g)
            args = _native_args(
                out, x, m_probe, a, b, g_probe, c, m_prev, d, z, s, self.lam, self.kappa
            )
            call = _PreparedCall(kernel.guided_step, args, m_probe, g_probe)
            call.out = out
            self.calls.append(call)
        else:
            self.calls.append(None)  # replayed through the public op
        return result


class ReplayLaunch(Launch):
    """Replays the calls a :class:`RecordingLaunch` recorded, in order."""

    def __init__(self, recording: RecordingLaunch) -> None:
        super().__init__(recording.lam, recording.kappa)
        self.calls = recording.calls
        self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def __call__(self, out, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None):
        call = self.calls[self.position]
        self.position += 1
        if (
            call is None
            or call.out is not out
            or not call.matches(m)
            or (g is None) != (call.g_at < 0)
            or (g is not None and not call.matches(g))
        ):
            # Not the recorded launch (or another backend): the public op decides, and
            # raises its own clear error for a bad model or guidance output.
            return super().__call__(out, x, m, a, b, g, c, m_prev, d, z, s)
        call(m, g)
        return out
