"""ATE Steer: guidance gradient through the frozen adaptation encoder, and the losses.

- :class:`Steer` — the paper's fine-tuning losses (``diffusion_loss``, ``flow_loss``).
- :class:`LatentGuidance` — inference-time steering toward a target latent, passed to a
  sampler as ``guidance=``; it implements the :class:`~ate_fast.guidance.Guidance` protocol
  (re-exported here with the guidance coefficients, which live in :mod:`ate_fast.guidance`).
"""

from ate_fast.guidance import Guidance, diffusion_guidance_coefficient, flow_guidance_coefficient
from ate_fast.steer.encoder import FrozenEncoder
from ate_fast.steer.latent_gradient import latent_distance_gradient
from ate_fast.steer.latent_guidance import LatentGuidance
from ate_fast.steer.steer import Steer, SteerLoss

__all__ = [
    "FrozenEncoder",
    "Guidance",
    "LatentGuidance",
    "Steer",
    "SteerLoss",
    "diffusion_guidance_coefficient",
    "flow_guidance_coefficient",
    "latent_distance_gradient",
]
