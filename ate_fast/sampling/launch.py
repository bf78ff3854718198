"""How a sampling loop issues its fused guided steps (:func:`ate_fast.guided_step`).

:class:`Launch` calls the public op: validation, backend dispatch, then the kernel; it
is what a CUDA graph captures. ``sample()`` uses :class:`CachedLaunch`: on the CPU the
first launch of each kind is validated and prepared, the next ones of that kind (every
step of a loop issues the same few) re-bind the model output, the gradient and the
coefficient rows after a shape check (measured with a trivial model, flow Euler 10,
B = 1: 158–167 µs per call instead of 187–207 µs without the finite checks); elsewhere it
is :class:`Launch`.

On the CPU there is no graph to capture, and the op's per-call validation and
dispatch (~20 µs) cost as much as the kernel on a small action chunk many times over.
A captured CPU loop therefore records its launches once (:class:`RecordingLaunch`:
every call runs through the public, validated op and keeps the op's prepared launch,
:func:`ate_fast.ops.guided_step.prepare_launch`) and then replays them
(:class:`ReplayLaunch`): the buffers and coefficient rows are the same objects on every
replay, so each launch only checks the two tensors that change between calls — the
model output ``m`` and the guidance gradient ``g`` — and re-binds them in the prepared
native call.

Every step argument is passed by keyword: ``launch(out, x=..., m=..., a=..., b=...)``.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ate_fast.ops.guided_step import guided_step, prepare_launch
from ate_fast.ops.native_abi import PreparedLaunch


class Launch:
    """``out = a·x + b·(m + scale·clip(c·g, −clamp, clamp)) + d·m_prev + s·z`` through the
    public op; ``scale`` (λ) and ``clamp`` (κ) are the guidance's for the whole run."""

    def __init__(self, scale: float = 1.0, clamp: float = math.inf) -> None:
        self.scale = scale
        self.clamp = clamp

    def __call__(
        self,
        out: Tensor,
        *,
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
            x, m, a=a, b=b, g=g, c=c, scale=self.scale, clamp=self.clamp,
            m_prev=m_prev, d=d, z=z, s=s, out=out,
        )  # fmt: skip


class CachedLaunch(Launch):
    """``sample()``'s launches on the CPU: the first launch of each kind runs through the
    public, validated op and is prepared (:func:`ate_fast.ops.guided_step.prepare_launch`
    with the coefficient rows as slots); the next launches of that kind — the same
    ``out``, ``x``, ``m_prev`` and ``z`` objects, the same optional arguments given — only
    check the tensors that change (``m``, ``g`` and the rows: shape, dtype, device,
    contiguity) and re-bind them in the prepared native call. Any other launch, or one
    whose tensors fail the check, goes through the public op (and its clear errors).
    One instance serves one pass of the loop (its buffers are the same objects).
    """

    def __init__(self, scale: float = 1.0, clamp: float = math.inf) -> None:
        super().__init__(scale, clamp)
        self.prepared: dict[tuple, Optional[tuple]] = {}

    def __call__(self, out, *, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None):
        if g is None:
            c = None
        given = (g is not None, a is not None, c is not None, d is not None, s is not None)
        key = (id(out), id(x), id(m_prev), id(z), given)
        entry = self.prepared.get(key)
        if entry is not None:
            tensors = [t for t in (m, g, a, b, c, d, s) if t is not None]
            checks, run = entry
            if all(check(t) for check, t in zip(checks, tensors)):
                run(*tensors)
                return out
        result = super().__call__(out, x=x, m=m, a=a, b=b, g=g, c=c, m_prev=m_prev, d=d, z=z, s=s)
        if key not in self.prepared:
            prepared = prepare_launch(
                out, x, m, a, b, g, c, m_prev, d, z, s, self.scale, self.clamp, row_slots=True
            )
            self.prepared[key] = None if prepared is None else _fast_path(prepared)
        return result


def _fast_path(prepared: PreparedLaunch) -> tuple:
    """(slot checks, positional runner) over the slots in the order m, g, a, b, c, d, s."""
    names = [n for n in ("m", "g", "a", "b", "c", "d", "s") if n in prepared.slots]
    return [prepared.checker(n) for n in names], prepared.bound(*names)


class _Recorded:
    """One recorded launch: its destination and, where the CPU kernel ran it, the op's
    prepared call as a positional fast path and the checks of the slots that change."""

    __slots__ = ("g_ok", "guided", "m_ok", "out", "run")

    def __init__(self, out: Tensor, prepared: Optional[PreparedLaunch]) -> None:
        self.out = out
        self.run = self.m_ok = self.g_ok = None
        self.guided = False
        if prepared is not None:
            self.guided = "g" in prepared.slots
            self.m_ok = prepared.checker("m")
            self.g_ok = prepared.checker("g") if self.guided else None
            self.run = prepared.bound("m", "g") if self.guided else prepared.bound("m")


class RecordingLaunch(Launch):
    """A :class:`Launch` that also records each call for :class:`ReplayLaunch`."""

    def __init__(self, scale: float = 1.0, clamp: float = math.inf) -> None:
        super().__init__(scale, clamp)
        self.calls: list[_Recorded] = []

    def __call__(self, out, *, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None):
        result = super().__call__(out, x=x, m=m, a=a, b=b, g=g, c=c, m_prev=m_prev, d=d, z=z, s=s)
        if g is None:
            c = None
        prepared = prepare_launch(out, x, m, a, b, g, c, m_prev, d, z, s, self.scale, self.clamp)
        self.calls.append(_Recorded(out, prepared))
        return result


class ReplayLaunch(Launch):
    """Replays the calls a :class:`RecordingLaunch` recorded, in order."""

    def __init__(self, recording: RecordingLaunch) -> None:
        super().__init__(recording.scale, recording.clamp)
        self.calls = recording.calls
        self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def __call__(self, out, *, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None):
        call = self.calls[self.position]
        self.position += 1
        if (
            call.run is None
            or call.out is not out
            or (g is not None) != call.guided
            or not call.m_ok(m)
            or (g is not None and not call.g_ok(g))
        ):
            # Not the recorded launch (or another backend): the public op decides, and
            # raises its own clear error for a bad model or guidance output.
            return super().__call__(out, x=x, m=m, a=a, b=b, g=g, c=c, m_prev=m_prev, d=d, z=z, s=s)
        if g is None:
            call.run(m)
        else:
            call.run(m, g)
        return out
