"""ate_fast's RTCGuidance reproduces LeRobot 0.4.4's own RTC (lerobot.policies.rtc) on a
real SmolVLA: same model, noise and settings -> the same guided chunk.

LeRobot's RTCProcessor evaluates the policy before it enables gradients on x, so its
correction is W ⊙ (Y − x̂) without the policy's Jacobian: ``RTCGuidance(jacobian=False)``
is that computation; the paper's (``jacobian=True``, the default) differs from it."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error
from lerobot.configs.types import RTCAttentionSchedule
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from tiny_policies import smolvla_batch

from ate_fast.integrations.lerobot import patch_policy
from ate_fast.realtime import RTCGuidance

SCHEDULES = {"linear": RTCAttentionSchedule.LINEAR, "exp": RTCAttentionSchedule.EXP}


@pytest.mark.parametrize(("schedule", "delay", "lerobot_horizon"), [
    ("linear", 2, 6), ("exp", 3, 8), ("linear", 0, 5),
])  # fmt: skip
def test_rtc_guided_chunk_equals_lerobots(smolvla, schedule, delay, lerobot_horizon):
    cfg = smolvla.config
    batch = smolvla_batch(smolvla, batch_size=2)
    gen = torch.Generator().manual_seed(3)
    shape = (2, cfg.chunk_size, cfg.max_action_dim)
    noise, prev = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    cfg.rtc_config = RTCConfig(
        enabled=True, prefix_attention_schedule=SCHEDULES[schedule], max_guidance_weight=5.0,
        execution_horizon=lerobot_horizon,
    )  # fmt: skip
    smolvla.init_rtc_processor()
    ref = smolvla.predict_action_chunk(
        dict(batch), noise=noise.clone(), inference_delay=delay, prev_chunk_left_over=prev,
        execution_horizon=lerobot_horizon,
    )  # fmt: skip
    plain = smolvla.predict_action_chunk(dict(batch), noise=noise.clone())  # no prefix given
    cfg.rtc_config.enabled = False  # ate_fast samples instead of LeRobot's processor
    # LeRobot's execution_horizon is where the mask reaches 0 (our H − s)
    settings = dict(execution_horizon=cfg.chunk_size - lerobot_horizon,
                    max_guidance_weight=5.0, prefix_schedule=schedule)  # fmt: skip
    rtc = RTCGuidance(prev, delay, jacobian=False, **settings)
    with patch_policy(smolvla, guidance=rtc):
        out = smolvla.predict_action_chunk(dict(batch), noise=noise.clone())
    assert relative_error(out, ref) <= 1e-5
    assert relative_error(plain, ref) > 1e-2  # the guidance did something
    with patch_policy(smolvla, guidance=RTCGuidance(prev, delay, **settings), capture=True):
        paper = smolvla.predict_action_chunk(dict(batch), noise=noise.clone())
    assert relative_error(paper, ref) > 1e-4  # the paper's VJP through the policy differs
