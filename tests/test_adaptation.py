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


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


@pytest.mark.parametrize(
    "change,error,match",
    [
        # one NaN in the demonstrations made every weight of the policy NaN, silently
        (lambda d: {"chunks": _with_nan(d.chunks)}, ValueError, "chunks contains NaN"),
        (lambda d: {"cond": _with_nan(d.obs)}, ValueError, "cond contains NaN"),
        (lambda d: {"mask": torch.zeros(D)}, ValueError, "mask must mark at least one"),
        (lambda d: {"cond": d.obs[:-1]}, ValueError, "cond must be a tensor"),
        (lambda d: {"chunks": d.chunks[:0], "cond": d.obs[:0]}, ValueError, "at least one chunk"),
        (lambda d: {"steps": 0}, ValueError, "steps must be >= 1"),  # was ZeroDivisionError
        (lambda d: {"steps": True}, TypeError, "steps must be an int"),
        (lambda d: {"batch": 2.0}, TypeError, "batch must be an int"),
        (lambda d: {"lr": float("nan")}, ValueError, "lr must be finite"),
    ],
)
def test_train_chunk_policy_refuses_bad_input(change, error, match):
    data = _data(3)
    args = {"chunks": data.chunks, "cond": data.obs, "mask": data.mask, "steps": 2,
            "batch": 4, "lr": 1e-3}  # fmt: skip
    args.update(change(data))
    policy = _policy(0)
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(error, match=match):
        train_chunk_policy(policy, objective=FlowMatching(), seed=0, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # untouched


def test_settings_and_windows_refuse_bad_input():
    base = dict(latent_dim=2, hidden=(16,), lr=1e-3, stage1_epochs=2, stage1_batch=16,
                stage2_epochs=2, stage2_batch=64)  # fmt: skip
    for change, error, match in [
        ({"stage1_epochs": 0}, ValueError, "stage1_epochs must be >= 1"),  # ZeroDivisionError
        ({"stage2_batch": True}, TypeError, "stage2_batch must be an int"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"hidden": 16}, TypeError, "hidden must be a sequence"),
        ({"hidden": (16, 0)}, ValueError, r"hidden\[1\] must be >= 1"),
    ]:
        with pytest.raises(error, match=match):
            AlignSettings(**{**base, **change})
    actions = np.zeros((5, 2))
    for args, error, match in [
        ((actions, 0), ValueError, "horizon must be >= 1"),
        ((actions, True), TypeError, "horizon must be an int"),
        ((actions[:, 0], 3), ValueError, r"actions must be an array \[L, D\]"),
        ((actions[:0], 3), ValueError, "with L >= 1"),
    ]:
        with pytest.raises(error, match=match):
            chunk_windows(*args)
