"""The guidance contract, below the samplers (:mod:`ate_fast.sampling`) and the training
losses (:mod:`ate_fast.steer`) that both use it.

- :class:`Guidance`: the protocol ``sample(..., guidance=...)`` calls every step, and
  :func:`check_guidance`, which validates an object against it.
- The guidance coefficient ``c`` per parameterisation (ATE_METHOD.md, Stage 3):
  :func:`diffusion_guidance_coefficient`, :func:`flow_guidance_coefficient`.

One name per quantity everywhere in ate_fast: λ is ``scale`` (the correction's weight),
κ is ``clamp`` (the element-wise bound on ``c·g``), d_z is the latent size.
"""

from ate_fast.guidance.coefficients import (
    DENOMINATOR_FLOOR,
    FLOW_CONVENTIONS,
    PREDICTION_TYPES,
    diffusion_guidance_coefficient,
    flow_guidance_coefficient,
)
from ate_fast.guidance.protocol import (
    GUIDANCE_MODES,
    POLICY_VJP,
    SCALAR_SLOPE_MODES,
    Guidance,
    check_guidance,
    check_scale_and_clamp,
)

__all__ = [
    "DENOMINATOR_FLOOR",
    "FLOW_CONVENTIONS",
    "GUIDANCE_MODES",
    "POLICY_VJP",
    "PREDICTION_TYPES",
    "SCALAR_SLOPE_MODES",
    "Guidance",
    "check_guidance",
    "check_scale_and_clamp",
    "diffusion_guidance_coefficient",
    "flow_guidance_coefficient",
]
