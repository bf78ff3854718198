"""NaN / inf checks on what a sampling loop produces at each step.

A model or guidance that returns NaN would otherwise turn every later step, and the
actions, into NaN without a word. Each model output and guidance gradient of step k is
checked, so the error names the step and the source (``model_fn`` or
``guidance.gradient``):

* :class:`EagerFiniteCheck` (``sample()`` on the CPU, on by default): each output is
  checked as it comes; raises at the first bad one, before it reaches the sample.
* :class:`DeferredFiniteCheck` (``sample()`` on an accelerator, where a check per step
  would be a host sync per step; ``capture(..., check_finite_steps=True)``, opt-in): the
  loop writes per-step flags into a device tensor (captured into a CUDA graph, no host
  sync inside the loop); :meth:`DeferredFiniteCheck.raise_if_bad` reads them once after
  the loop and names the first bad step.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import Tensor

from ate_fast.errors import NonFiniteError
from ate_fast.sampling.inputs import all_finite, non_finite_kind

SOURCES = ("model_fn", "guidance.gradient")


class FiniteCheck(Protocol):
    """What a :class:`ate_fast.sampling.Run` calls on each step output."""

    def reset(self) -> None: ...

    def observe(self, step: int, source: str, t: Tensor) -> None: ...


class EagerFiniteCheck:
    """Raise :class:`NonFiniteError` as soon as a step output holds NaN or inf."""

    def reset(self) -> None:
        """Nothing to reset: every observation is checked at once."""

    def observe(self, step: int, source: str, t: Tensor) -> None:
        """Check ``t`` [B, H, D], the output of ``source`` at step ``step`` (one sync)."""
        if not all_finite(t):
            raise NonFiniteError(
                f"step {step}: {source} returned {non_finite_kind(t)} (expected finite values for "
                f"every element of its [B, H, D] output); sample(..., check_finite=False) "
                "skips this check"
            )


class DeferredFiniteCheck:
    """Per-step finiteness flags kept on the device, read once after the loop.

    ``flags`` is ``[K, len(SOURCES)]`` bool; :meth:`observe` ANDs ``isfinite(t).all()``
    into ``flags[k, source]`` without a host sync (so it can be captured in a CUDA graph).
    """

    def __init__(
        self,
        num_steps: int,
        device: torch.device,
        where: str = "the captured loop",
        hint: str = "checked because capture(..., check_finite_steps=True)",
    ) -> None:
        self.flags = torch.ones(num_steps, len(SOURCES), dtype=torch.bool, device=device)
        self.where, self.hint = where, hint

    def reset(self) -> None:
        self.flags.fill_(True)

    def observe(self, step: int, source: str, t: Tensor) -> None:
        self.flags[step, SOURCES.index(source)].logical_and_(torch.isfinite(t).all())

    def first_bad(self) -> Optional[tuple[int, str]]:
        """``(step, source)`` of the first non-finite output of the last run, or None
        (one host sync)."""
        flags = self.flags.cpu()
        if bool(flags.all()):
            return None
        step, index = (~flags).nonzero()[0].tolist()
        return step, SOURCES[index]

    def raise_if_bad(self) -> None:
        """Raise :class:`NonFiniteError` naming the first bad step and source, if any."""
        bad = self.first_bad()
        if bad is not None:
            raise NonFiniteError(
                f"step {bad[0]}: {bad[1]} returned NaN or inf in {self.where} ({self.hint})"
            )


def finite_check_for(device: torch.device, num_steps: int) -> FiniteCheck:
    """``sample()``'s step check: eager on the CPU (the check costs no sync there), flags
    read once after the loop elsewhere (a check per step would be a host sync per step)."""
    if device.type == "cpu":
        return EagerFiniteCheck()
    return DeferredFiniteCheck(
        num_steps, device, "sample()", "sample(..., check_finite=False) skips this check"
    )
