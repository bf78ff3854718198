"""Fused ops with four backends each (ref, cpu, triton, cuda); see :mod:`ate_fast.ops.backends`."""

from ate_fast.ops.backends import BackendUnavailableError
from ate_fast.ops.guided_step import guided_step, selected_backend
from ate_fast.ops.guided_step_ref import guided_step_reference
from ate_fast.ops.mlp_guidance import mlp_encoder_parts, mlp_guidance
from ate_fast.ops.mlp_guidance_ref import mlp_guidance_reference

__all__ = [
    "BackendUnavailableError",
    "guided_step",
    "guided_step_reference",
    "mlp_encoder_parts",
    "mlp_guidance",
    "mlp_guidance_reference",
    "selected_backend",
]
