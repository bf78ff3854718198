"""The README's LeRobot example (its ```python lerobot block) runs as written, given a
LeRobot policy, an adaptation VAE and a training batch."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tiny_policies import diffusion_batch, diffusion_train_batch, make_tiny_diffusion

from ate_fast import ActionVAE
from ate_fast.integrations.lerobot import vae_spec

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python lerobot\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_lerobot_block_runs():
    assert len(BLOCKS) == 1
    policy = make_tiny_diffusion().train()
    spec = vae_spec(policy)
    vae = ActionVAE(spec.action_dim, spec.horizon, latent_dim=8, arch="mlp", hidden_dims=(32,))
    namespace = {"policy": policy, "vae": vae, "batch": diffusion_train_batch(policy)}
    exec(compile(BLOCKS[0], "README.md[python lerobot block]", "exec"), namespace)
    patch = namespace["patch"]
    assert patch.active and torch.isfinite(namespace["loss"])
    policy.eval()
    action = policy.select_action(diffusion_batch(policy))
    assert action.shape == (2, spec.action_dim) and len(patch.loop.captures) == 1
    patch.remove()
