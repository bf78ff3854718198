"""patch_policy: the patched LeRobot policies sample what LeRobot samples, for the same
noise (≤ 1e-5 relative), eagerly and captured; select_action's queue is kept."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error
from tiny_policies import diffusion_batch, make_tiny_diffusion, smolvla_batch

from ate_fast.errors import InvalidArgumentError
from ate_fast.integrations.lerobot import patch_policy
from ate_fast.sampling import CapturedSampler, DiffusionSampler, FlowSampler


def _chunk(policy, batch, seed):
    torch.manual_seed(seed)
    return policy.predict_action_chunk(batch)


def _diffusion_chunks(policy, batch, seed):
    """The whole horizon chunk (generate_actions keeps only the executed steps)."""
    policy.reset()
    policy.select_action(dict(batch))  # fills the observation queues
    queued = {k: torch.stack(list(policy._queues[k]), dim=1) for k in batch}
    with torch.no_grad():
        cond = policy.diffusion._prepare_global_conditioning(queued)
        torch.manual_seed(seed)
        return policy.diffusion.conditional_sample(next(iter(batch.values())).shape[0], cond)


def test_diffusion_matches_lerobot(diffusion):
    batch = diffusion_batch(diffusion, batch_size=3)
    ref = _diffusion_chunks(diffusion, batch, seed=1)
    with patch_policy(diffusion) as patch:
        assert isinstance(patch.loop.sampler, DiffusionSampler)
        out = _diffusion_chunks(diffusion, batch, seed=1)
    assert out.shape == ref.shape == (3, 16, 2)
    assert relative_error(out, ref) <= 1e-5
    # a different seed gives different actions (the comparison is not vacuous)
    assert relative_error(_diffusion_chunks(diffusion, batch, seed=2), ref) > 1e-2


@pytest.mark.parametrize("scheduler", ["DDPM", "DDIM"])
def test_diffusion_batch1_matches_lerobot_with_chunk_convs(monkeypatch, scheduler):
    """At batch 1 the patched U-Net's convolutions run as row GEMMs (ChunkConv1d: the
    128-channel level at 8 steps qualifies) and still sample what LeRobot samples;
    remove() gives the layers their classes back."""
    from torch import nn

    from ate_fast.models import chunk_conv

    rows = []
    original = chunk_conv.conv1d_rows
    monkeypatch.setattr(chunk_conv, "conv1d_rows", lambda *a: rows.append(1) or original(*a))
    policy = make_tiny_diffusion(scheduler=scheduler, down_dims=(32, 128))
    convs = [m for m in policy.diffusion.unet.modules() if type(m) is nn.Conv1d]
    batch = diffusion_batch(policy, batch_size=1)
    ref = _diffusion_chunks(policy, batch, seed=1)
    assert not rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the row form's weight threshold scales with the threads
    try:
        with patch_policy(policy):
            assert convs and all(type(m) is chunk_conv.ChunkConv1d for m in convs)
            out = _diffusion_chunks(policy, batch, seed=1)
    finally:
        torch.set_num_threads(threads)
    assert rows  # the row form ran
    assert all(type(m) is nn.Conv1d for m in convs)
    assert out.shape == ref.shape == (1, 16, 2)
    assert relative_error(out, ref) <= 1e-5


def _select_actions(policy, batch, steps, seed):
    policy.reset()
    torch.manual_seed(seed)
    return [policy.select_action(dict(batch)) for _ in range(steps)]


def _assert_captured_select_actions_match(policy, batch, steps, seed):
    """``steps`` of select_action (queue refills included): patched and captured equals
    LeRobot's own for the same seed."""
    ref = _select_actions(policy, batch, steps, seed)
    with patch_policy(policy, capture=True):
        out = _select_actions(policy, batch, steps, seed)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert relative_error(a, b) <= 1e-5


def test_diffusion_select_action_queue(ddpm):
    batch = diffusion_batch(ddpm, batch_size=2)
    steps = ddpm.config.n_action_steps + 2  # crosses a chunk boundary
    assert _select_actions(ddpm, batch, 1, seed=0)[0].shape == (2, 2)
    _assert_captured_select_actions_match(ddpm, batch, steps, seed=0)


def test_diffusion_capture_equals_sample(ddpm):
    batch = diffusion_batch(ddpm, batch_size=2)
    with patch_policy(ddpm):
        eager = _diffusion_chunks(ddpm, batch, seed=3)
    with patch_policy(ddpm, capture=True) as patch:
        first = _diffusion_chunks(ddpm, batch, seed=3)
        again = _diffusion_chunks(ddpm, batch, seed=3)
        other = _diffusion_chunks(ddpm, batch, seed=4)
        assert len(patch.loop.captures) == 1
        assert isinstance(next(iter(patch.loop.captures.values())), CapturedSampler)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    # the returned actions are not the capture's reused buffer
    assert not torch.equal(first, other)


def test_smolvla_matches_lerobot(smolvla):
    batch = smolvla_batch(smolvla, batch_size=2)
    ref = _chunk(smolvla, dict(batch), seed=5)
    with patch_policy(smolvla) as patch:
        assert isinstance(patch.loop.sampler, FlowSampler)
        out = _chunk(smolvla, dict(batch), seed=5)
    assert out.shape == ref.shape == (2, smolvla.config.chunk_size, 6)
    assert relative_error(out, ref) <= 1e-5
    assert relative_error(_chunk(smolvla, dict(batch), seed=6), ref) > 1e-2


def test_smolvla_capture_equals_sample_and_select_action(smolvla):
    batch = smolvla_batch(smolvla, batch_size=2)
    with patch_policy(smolvla):
        eager = _chunk(smolvla, dict(batch), seed=7)
    with patch_policy(smolvla, capture=True) as patch:
        captured = [_chunk(smolvla, dict(batch), seed=7) for _ in range(2)]
        assert len(patch.loop.captures) == 1
    for out in captured:
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
    _assert_captured_select_actions_match(smolvla, batch, smolvla.config.n_action_steps + 1, seed=8)


def test_capturable_embed_suffix_is_exact(smolvla):
    from ate_fast.integrations.lerobot.smolvla_policy import capturable_embed_suffix

    model = smolvla.model
    x = torch.randn(3, smolvla.config.chunk_size, smolvla.config.max_action_dim)
    t = torch.full((3,), 0.7)
    with torch.no_grad():
        ref = model.embed_suffix(x, t)
        out = capturable_embed_suffix(model)(x, t)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_remove_restores_lerobot(smolvla, ddpm):
    for policy, inner, name in (
        (smolvla, smolvla.model, "sample_actions"),
        (ddpm, ddpm.diffusion, "conditional_sample"),
    ):
        original = getattr(inner, name)
        patch = patch_policy(policy, capture=True)
        assert getattr(inner, name) is not original and patch.active
        patch.remove()
        patch.remove()  # idempotent
        assert getattr(inner, name) == original and name not in inner.__dict__
        assert "embed_suffix" not in inner.__dict__


@pytest.mark.parametrize("scale", [0.0, 50.0])
def test_latent_guidance_through_patch(smolvla, scale):
    """Guidance sees the padded chunk; with the spec's mask padded dims get no gradient."""
    from ate_fast import ActionVAE, LatentGuidance
    from ate_fast.integrations.lerobot import vae_spec

    spec = vae_spec(smolvla)
    torch.manual_seed(0)
    vae = ActionVAE(spec.action_dim, spec.horizon, latent_dim=8, arch="mlp", hidden_dims=(32,))
    target = torch.randn(8)
    guidance = LatentGuidance(vae, target, scale=scale, clamp=1.0, mask=spec.mask())
    x = torch.randn(2, spec.horizon, spec.action_dim)
    g = guidance.gradient(x, x, torch.ones(2))
    assert g[..., spec.raw_action_dim :].abs().max() == 0
    assert g[..., : spec.raw_action_dim].abs().max() > 0
    batch = smolvla_batch(smolvla, batch_size=2)
    plain = _chunk(smolvla, dict(batch), seed=9)
    with patch_policy(smolvla, guidance=guidance):
        guided = _chunk(smolvla, dict(batch), seed=9)
    if scale == 0.0:
        assert relative_error(guided, plain) <= 1e-5
    else:
        assert relative_error(guided, plain) > 1e-3
    # without the spec's mask the padded dims would be guided: refused
    with pytest.raises(InvalidArgumentError, match="guidance: has no mask, but the policy"):
        patch_policy(smolvla, guidance=LatentGuidance(vae, target, scale=scale))
    assert "sample_actions" not in smolvla.model.__dict__
