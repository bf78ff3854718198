"""The protocol between inference-time guidance and the samplers.

Defined once, in :mod:`ate_fast.sampling.guidance` (the samplers consume it); re-exported
here because :class:`ate_fast.steer.LatentGuidance` implements it.
"""

from ate_fast.sampling.guidance import GUIDANCE_MODES, Guidance

__all__ = ["GUIDANCE_MODES", "Guidance"]
