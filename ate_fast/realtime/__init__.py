"""Real-time control of chunked policies: real-time chunking (RTC) as inference-time
guidance (Black, Galliker, Levine, arXiv 2506.07339; docs/rtc.md).

- :class:`RTCGuidance`: inpaint the next chunk toward the previous one, through the policy
  (a ``"policy_vjp"`` :class:`~ate_fast.guidance.Guidance` for :class:`ate_fast.FlowSampler`).
- :func:`prefix_weights`, :func:`prefix_weight_table`: the soft mask W over the chunk.
"""

from ate_fast.realtime.prefix_weights import PREFIX_SCHEDULES, prefix_weight_table, prefix_weights
from ate_fast.realtime.rtc import DEFAULT_MAX_GUIDANCE_WEIGHT, RTCGuidance, rtc_guidance_weight

__all__ = [
    "DEFAULT_MAX_GUIDANCE_WEIGHT",
    "PREFIX_SCHEDULES",
    "RTCGuidance",
    "prefix_weight_table",
    "prefix_weights",
    "rtc_guidance_weight",
]
