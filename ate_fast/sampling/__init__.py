"""Drop-in samplers for diffusion and flow action heads, with inference-time guidance
and captured (CUDA-graph) loops.

- :class:`NoiseSchedule`: diffusers' beta schedules, value for value.
- :class:`DiffusionSampler`: DDPM, DDIM, DPM-Solver++ (matches diffusers step for step).
- :class:`FlowSampler`: Euler / Heun flow-matching ODE (openpi or diffusers time grid).
- :class:`Guidance`: the protocol of ``sample(..., guidance=...)``.
- :class:`CapturedSampler`: what ``sampler.capture(...)`` returns.

Every update goes through the fused :func:`ate_fast.ops.guided_step`.
"""

from ate_fast.sampling.capture import CapturedSampler
from ate_fast.sampling.diffusion import DiffusionSampler
from ate_fast.sampling.flow import FlowSampler
from ate_fast.sampling.guidance import Guidance, check_guidance
from ate_fast.sampling.sampler import Sampler
from ate_fast.sampling.schedule import NoiseSchedule

__all__ = [
    "CapturedSampler",
    "DiffusionSampler",
    "FlowSampler",
    "Guidance",
    "NoiseSchedule",
    "Sampler",
    "check_guidance",
]
