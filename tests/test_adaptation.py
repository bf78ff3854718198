"""The shared adaptation pipeline (``ate_fast.adaptation``): chunk windows, the align step,
the objectives and the training loop. Tiny sizes; no simulator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ate_fast.adaptation import (
    AlignSettings,
    ChunkData,
    EpsilonDiffusion,
    FlowMatching,
    align_source,
    align_target,
    chunk_windows,
    new_chunk_vae,
    train_chunk_policy,
)
from ate_fast.models import make_head
from ate_fast.sampling import NoiseSchedule
from ate_fast.steer import Steer

H, D, OBS = 4, 3, 5
SETTINGS = AlignSettings(
    latent_dim=2,
    hidden=(16,),
    lr=1e-3,
    stage1_epochs=2,
    stage1_batch=16,
    stage2_epochs=2,
    stage2_batch=64,
)


def _data(seed: int, episodes: int = 4, length: int = 12) -> ChunkData:
    rng = np.random.default_rng(seed)
    chunks, episode = [], []
    for e in range(episodes):
        chunks.append(chunk_windows(rng.uniform(-1, 1, (length, D)), H))
        episode.append(np.full(length, e))
    chunks_t = torch.from_numpy(np.concatenate(chunks)).float()
    return ChunkData(
        obs=torch.from_numpy(rng.normal(size=(len(chunks_t), OBS))).float(),
        chunks=chunks_t,
        mask=torch.tensor([1.0, 1.0, 0.0]),
        episode=np.concatenate(episode),
        episodes=episodes,
    )


def _policy(seed: int, time_scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_head(
        "mlp", "flat", horizon=H, action_dim=D, hidden=16, depth=1, cond_dim=OBS,
        time_scale=time_scale,
    )  # fmt: skip


def test_adaptation_imports_neither_demo_nor_eval():
    code = (
        "import sys, importlib, pkgutil, ate_fast.adaptation as a; "
        "[importlib.import_module(f'ate_fast.adaptation.{m.name}') "
        "for m in pkgutil.iter_modules(a.__path__)]; "
        "bad = [m for m in sys.modules if m.startswith(('ate_fast.demo', 'ate_fast.eval'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chunk_windows_repeat_the_last_action():
    actions = np.arange(10.0).reshape(5, 2)
    windows = chunk_windows(actions, 3)
    assert windows.shape == (5, 3, 2)
    np.testing.assert_array_equal(windows[1], actions[1:4])
    np.testing.assert_array_equal(windows[4], actions[[4, 4, 4]])


def test_align_step_is_seeded_and_keeps_the_global_rng():
    source, target = _data(0), _data(1, episodes=2)
    outcomes = []
    for _ in range(2):
        state = torch.get_rng_state()
        vae1 = new_chunk_vae(D, H, SETTINGS, seed=3)
        assert torch.equal(torch.get_rng_state(), state)
        with torch.random.fork_rng():
            src = align_source(vae1, source.vae_dataset(), SETTINGS, seed=4, prior_seed=5)
            vae2 = new_chunk_vae(D, H, SETTINGS, seed=6)
            tgt = align_target(vae2, target.vae_dataset(), src.prior, SETTINGS, seed=4)
        outcomes.append((src.stats, tgt.stats, tgt.mean))
    (s1, t1, m1), (s2, t2, m2) = outcomes
    assert s1 == s2 and t1 == t2 and torch.equal(m1, m2)
    assert set(s1) == {"steps", "val_recon", "prior"} and s1["steps"] > 0
    assert set(t1) == {"steps", "recon", "prior_logp"}
    assert m1.shape == (SETTINGS.latent_dim,)


@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_one_seed_one_set_of_batches(kind):
    """Two policies trained with one seed end identical; a Steer run with λ = 0 and that
    seed takes the same steps (same batches, noise and times), so it ends at the same loss."""
    data = _data(2)
    if kind == "flow":
        objective, scale = FlowMatching(), 1.0
    else:
        schedule = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
        objective, scale = EpsilonDiffusion(schedule), 0.01
    fits, policies = [], []
    for _ in range(2):
        policy = _policy(0, scale)
        fit = train_chunk_policy(
            policy, data.chunks, data.obs, data.mask, objective, steps=3, batch=8, lr=1e-3,
            seed=7,
        )  # fmt: skip
        fits.append(fit)
        policies.append(policy)
    assert fits[0].loss == fits[1].loss and np.isfinite(fits[0].loss) and fits[0].steer == {}
    for a, b in zip(policies[0].parameters(), policies[1].parameters()):
        assert torch.equal(a, b)
    vae = new_chunk_vae(D, H, SETTINGS, seed=0)
    steer = Steer(vae, scale=0.0, mask=data.mask)  # λ = 0: the plain loss, through Steer
    steered = _policy(0, scale)
    fit = train_chunk_policy(
        steered, data.chunks, data.obs, data.mask, objective, steps=3, batch=8, lr=1e-3,
        seed=7, steer=steer,
    )  # fmt: skip
    assert fit.loss == pytest.approx(fits[0].loss, rel=1e-6)
    assert set(fit.steer) == {"grad_norm", "clamp_fraction", "correction_ratio"}


def test_steer_diagnostics_summed_on_host_or_device_agree():
    data = _data(3)
    vae = new_chunk_vae(D, H, SETTINGS, seed=1)
    means = []
    for on_host in (False, True):
        fit = train_chunk_policy(
            _policy(1), data.chunks, data.obs, data.mask, FlowMatching(), steps=5, batch=8,
            lr=1e-3, seed=2, steer=Steer(vae, scale=2.0, mask=data.mask),
            diagnostics_on_host=on_host,
        )  # fmt: skip
        means.append(fit.steer)
    assert means[0].keys() == means[1].keys()
    for name in means[0]:
        assert means[0][name] == pytest.approx(means[1][name], rel=1e-5)
