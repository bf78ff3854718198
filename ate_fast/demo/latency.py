"""Sampler latency for one observation (batch 1, the control-loop case): eager
``FlowSampler.sample()`` vs the captured loop ``capture()``, each without and with
inference-time guidance. Wall-clock numbers: they vary from run to run."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ate_fast.demo.embodiment import ACTION_DIM
from ate_fast.sampling import FlowSampler, Guidance

WARMUP_CALLS = 5


def _median_ms(fn: Callable[[], Tensor], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_CALLS):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sampler_latency(
    policy: nn.Module,
    obs: Tensor,
    guidance: Guidance,
    *,
    horizon: int,
    flow_steps: int,
    repeats: int,
    device: torch.device,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """``{"unguided": row, "guided": row}`` with ``row = {"eager_ms", "capture_ms",
    "capture_equals_eager"}`` for ``obs [1, OBS_DIM]`` (median of ``repeats`` calls)."""
    policy.eval()
    sampler = FlowSampler(policy, num_steps=flow_steps)
    noise = torch.randn(1, horizon, ACTION_DIM, generator=torch.Generator().manual_seed(seed))
    noise, obs = noise.to(device), obs.to(device)
    rows: dict[str, dict[str, Any]] = {}
    variants: tuple[tuple[str, Optional[Guidance]], ...] = (
        ("unguided", None),
        ("guided", guidance),
    )
    for name, g in variants:
        captured = sampler.capture(noise, obs, guidance=g)
        same = torch.equal(captured(noise, obs).clone(), sampler.sample(noise, obs, guidance=g))
        rows[name] = {
            "eager_ms": _median_ms(
                lambda g=g: sampler.sample(noise, obs, guidance=g), repeats, device
            ),
            "capture_ms": _median_ms(lambda c=captured: c(noise, obs), repeats, device),
            "capture_equals_eager": bool(same),
        }
    return rows
