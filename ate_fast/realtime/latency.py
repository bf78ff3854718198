"""The sampler's wall time per chunk for each real-time strategy: plain sampling
(``naive`` / ``ensemble``), inference-time RTC (one VJP through the policy per model
evaluation) and training-time RTC's prefix inpainting, eager and captured, measured
interleaved (round-robin over the variants, so load on a shared machine hits them alike)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from ate_fast.argument_checks import check_int
from ate_fast.realtime.prefix_inpainting import PrefixInpainting
from ate_fast.realtime.rtc import RTCGuidance

WARMUP_CALLS = 3


def strategy_latency(
    sampler: Any,
    noise: Tensor,
    cond: Any,
    *,
    execution_horizon: int,
    delay: int,
    repeats: int = 30,
) -> dict[str, dict[str, float]]:
    """Median and 90th-percentile milliseconds per chunk, ``{variant: {"median_ms",
    "p90_ms"}}`` for variants ``plain``, ``rtc``, ``inpainting`` each ``eager`` and
    ``captured`` (e.g. ``"rtc/captured"``), on ``noise`` [B, H, D] and ``cond``.

    ``sampler``: a ``FlowSampler``; ``delay`` d and ``execution_horizon`` s set the
    prefix (the previous chunk is a fixed random one: the cost does not depend on it).
    """
    repeats = check_int("repeats", repeats, 1, 1 << 20)
    prev = torch.randn_like(noise)
    rtc = RTCGuidance(prev, delay, execution_horizon=execution_horizon)
    inpaint = PrefixInpainting(prev, delay, max_delay=delay)
    calls: dict[str, Callable[[], Tensor]] = {
        "plain/eager": lambda: sampler.sample(noise, cond),
        "rtc/eager": lambda: sampler.sample(noise, cond, guidance=rtc),
        "inpainting/eager": lambda: sampler.sample(noise, cond, inpainting=inpaint),
    }
    with torch.no_grad():
        captured = {
            "plain/captured": sampler.capture(noise, cond),
            "rtc/captured": sampler.capture(noise, cond, guidance=rtc),
            "inpainting/captured": sampler.capture(noise, cond, inpainting=inpaint),
        }
    calls.update({k: (lambda c=c: c(noise, cond)) for k, c in captured.items()})
    times: dict[str, list[float]] = {k: [] for k in calls}
    device = noise.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for round_ in range(WARMUP_CALLS + repeats):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                sync()
                if round_ >= WARMUP_CALLS:
                    times[name].append(1e3 * (time.perf_counter() - t0))
    return {
        k: {
            "median_ms": statistics.median(v),
            "p90_ms": statistics.quantiles(v, n=10)[-1] if len(v) > 1 else v[0],
        }
        for k, v in times.items()
    }
