"""The sampler's inpainting option: a known part of the sample written into it at every step.

An inpainting object (e.g. :class:`ate_fast.realtime.PrefixInpainting`, training-time
real-time chunking) follows :class:`Inpainting`. ``FlowSampler.sample(...,
inpainting=obj)`` and ``capture(..., inpainting=obj)`` call ``obj.apply_(x)`` on the
sample ``x`` [B, H, D] before every model evaluation and after every step, so the known
positions are what the model sees and what the sampler returns, exactly. ``apply_`` must
be capturable (static buffers, no host sync): one capture then serves every value the
object's buffers take.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor

from ate_fast.errors import ArgumentTypeError


@runtime_checkable
class Inpainting(Protocol):
    """What a sampler's ``inpainting=`` option needs."""

    def check(self, noise: Tensor) -> None:
        """Raise :class:`~ate_fast.errors.InvalidArgumentError` if the object cannot
        inpaint samples shaped, typed and placed like ``noise`` [B, H, D]."""
        ...

    def apply_(self, x: Tensor) -> None:
        """Write the known positions into ``x`` [B, H, D], in place."""
        ...


def check_inpainting(inpainting: object, noise: Tensor) -> Optional[Inpainting]:
    """``inpainting`` (None or an :class:`Inpainting`) checked against ``noise`` [B, H, D]."""
    if inpainting is None:
        return None
    if not isinstance(inpainting, Inpainting):
        raise ArgumentTypeError(
            "inpainting must be None or an object with check(noise) and apply_(x) "
            f"(ate_fast.sampling.Inpainting, e.g. ate_fast.realtime.PrefixInpainting), got "
            f"{type(inpainting).__name__}"
        )
    inpainting.check(noise)
    return inpainting
