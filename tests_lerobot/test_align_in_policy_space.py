"""``ate-fast align stage1 --lerobot-policy``: a real LeRobot dataset (written by
LeRobotDataset.create) and a saved policy give a VAE in the policy's action space."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from tiny_policies import make_tiny_diffusion

from ate_fast.align import KIND_STAGE1, load_checkpoint
from ate_fast.cli import main
from ate_fast.integrations.lerobot import load_lerobot_stats, vae_spec


def _dataset(root, action_dim, episodes=3, length=30):
    features = {
        "action": {"dtype": "float32", "shape": (action_dim,), "names": None},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
    }
    ds = LeRobotDataset.create("local/tiny", fps=10, features=features, root=root,
                               use_videos=False)  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        for _ in range(length):
            ds.add_frame({
                "action": rng.uniform(-3, 5, action_dim).astype(np.float32),
                "observation.state": rng.standard_normal(4).astype(np.float32),
                "task": "push",
            })  # fmt: skip
        ds.save_episode()
    ds.finalize()
    return root


@pytest.mark.parametrize("kind", ["diffusion", "smolvla"])
def test_stage1_in_policy_space(kind, smolvla, tmp_path):
    policy = make_tiny_diffusion(action_dim=2) if kind == "diffusion" else smolvla
    spec = vae_spec(policy)
    policy.save_pretrained(tmp_path / "policy")
    data = _dataset(tmp_path / "data", spec.raw_action_dim)
    out = tmp_path / "vae"
    rc = main([
        "align", "stage1", "--data", str(data), "--lerobot-policy", str(tmp_path / "policy"),
        "--out", str(out), "--epochs", "1", "--latent-dim", "8", "--arch", "mlp",
        "--hidden", "32", "--batch-size", "16", "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    ckpt = load_checkpoint(out, kind=KIND_STAGE1)
    assert (ckpt.vae.horizon, ckpt.vae.action_dim) == (spec.horizon, spec.action_dim)
    expected = spec.normalizer(load_lerobot_stats(data))
    assert ckpt.normalizer.to_dict() == expected.to_dict()
    assert ckpt.action_space.dim_index.tolist() == spec.dims
    actions = torch.tensor(np.random.default_rng(1).uniform(-3, 5, (4, spec.raw_action_dim)))
    lo, hi = (-1, 1) if kind == "diffusion" else (-10, 10)
    normalized = ckpt.normalizer.normalize(actions)
    assert normalized.min() >= lo - 1e-6 and normalized.max() <= hi


def test_contradicting_flags(tmp_path, capsys):
    policy = make_tiny_diffusion(action_dim=2)
    policy.save_pretrained(tmp_path / "policy")
    data = _dataset(tmp_path / "data", 2, episodes=1)
    base = ["align", "stage1", "--data", str(data), "--lerobot-policy", str(tmp_path / "policy"),
            "--out", str(tmp_path / "vae"), "--epochs", "1"]  # fmt: skip
    for extra, message in (
        (["--horizon", "8"], "--horizon 8 contradicts --lerobot-policy"),
        (["--norm", "meanstd"], "--norm and --lerobot-policy exclude each other"),
        (["--action-dim", "4"], "--action-dim 4 contradicts"),
    ):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
