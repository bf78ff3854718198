"""Drop-in samplers for diffusion and flow action heads, with inference-time guidance
and captured (CUDA-graph) loops.

- :class:`NoiseSchedule`: diffusers' beta schedules, value for value.
- :class:`DiffusionSampler`: DDPM, DDIM, DPM-Solver++ (matches diffusers step for step).
- :class:`FlowSampler`: Euler / Heun flow-matching ODE (openpi or diffusers time grid).
- :class:`CapturedSampler`: what ``sampler.capture(...)`` returns.
- :class:`Inpainting`: the ``inpainting=`` option's protocol (known positions written into
  the sample at every step; :class:`ate_fast.realtime.PrefixInpainting`).
- :class:`Sampler`, :class:`Run`, :class:`StepTables`, :class:`StepBuffers`: the export
  seam — a sampler's per-step tables and its loop, which ``ate_fast.export`` traces.

The :class:`~ate_fast.guidance.Guidance` protocol lives in :mod:`ate_fast.guidance` (and
is re-exported here). Every update goes through the fused :func:`ate_fast.guided_step`.
"""

from ate_fast.guidance import Guidance, check_guidance
from ate_fast.sampling.capture import CapturedSampler
from ate_fast.sampling.diffusion import DiffusionSampler
from ate_fast.sampling.flow import FlowSampler
from ate_fast.sampling.inpainting import Inpainting
from ate_fast.sampling.sampler import MAX_NUM_STEPS, Run, Sampler
from ate_fast.sampling.schedule import NoiseSchedule
from ate_fast.sampling.workspace import StepBuffers, StepTables

__all__ = [
    "MAX_NUM_STEPS",
    "CapturedSampler",
    "DiffusionSampler",
    "FlowSampler",
    "Guidance",
    "Inpainting",
    "NoiseSchedule",
    "Run",
    "Sampler",
    "StepBuffers",
    "StepTables",
    "check_guidance",
]
