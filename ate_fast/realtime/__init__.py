"""Real-time control of chunked policies.

- :class:`RTCGuidance`: real-time chunking (RTC) as inference-time guidance (Black,
  Galliker, Levine, arXiv 2506.07339; docs/rtc.md): inpaint the next chunk toward the
  previous one, through the policy (a ``"policy_vjp"`` guidance for
  :class:`ate_fast.FlowSampler`).
- :func:`prefix_weights`, :func:`prefix_weight_table`: RTC's soft mask W over the chunk.
- :class:`TrainingTimeRTC`: training-time RTC (Black, Ren, Equi, Levine, arXiv
  2512.05964): simulated delays, a clean prefix and the loss without it.
- :class:`PrefixInpainting`: its sampler option (``inpainting=``): the committed prefix
  written into the sample at every step.
"""

from ate_fast.realtime.prefix_inpainting import PrefixInpainting
from ate_fast.realtime.prefix_schedules import PREFIX_SCHEDULES, prefix_weight_table, prefix_weights
from ate_fast.realtime.rtc import DEFAULT_MAX_GUIDANCE_WEIGHT, RTCGuidance, rtc_guidance_weight
from ate_fast.realtime.training import DELAY_DISTRIBUTIONS, PrefixBatch, TrainingTimeRTC

__all__ = [
    "DEFAULT_MAX_GUIDANCE_WEIGHT",
    "DELAY_DISTRIBUTIONS",
    "PREFIX_SCHEDULES",
    "PrefixBatch",
    "PrefixInpainting",
    "RTCGuidance",
    "TrainingTimeRTC",
    "prefix_weight_table",
    "prefix_weights",
    "rtc_guidance_weight",
]
