"""ATE Steer: guidance gradient through the frozen adaptation encoder, and the losses."""

from ate_fast.steer.coefficients import diffusion_guidance_coefficient, flow_guidance_coefficient

__all__ = ["diffusion_guidance_coefficient", "flow_guidance_coefficient"]
