"""ATE on a LeRobot Diffusion Policy, end to end (runs offline on the CPU in ~1 minute).

Run in the LeRobot environment (``bash tests_lerobot/run.sh`` makes one in
``.venv-lerobot``)::

    PYTHONPATH=. .venv-lerobot/bin/python examples/lerobot_ate.py --out /tmp/lerobot_ate

1. Two LeRobot datasets (``LeRobotDataset.create``): robot A (pre-training, many episodes)
   and robot B (the new robot, few demonstrations; its actions live in a rotated, rescaled
   frame). Task: a point reaching a goal; ``observation.state`` = position,
   ``observation.environment_state`` = goal, ``action`` = velocity.
2. Align in the policy's action space — the same commands as on the command line::

       ate-fast align stage1 --data A --lerobot-policy POLICY --out vae1 ...
       ate-fast align prior  --vae vae1 --data A --out prior.safetensors
       ate-fast align stage2 --prior prior.safetensors --data B --lerobot-policy POLICY ...

3. Fine-tune a state-only ``DiffusionPolicy`` on B with LeRobot's own data pipeline and
   training step (``update_policy``), once directly and once with
   ``steer_policy(policy, Steer.recommended(vae2))``.
4. Sample both through ``patch_policy(policy, capture=True)`` and report the executed
   actions' error against held-out B demonstrations.

With random seeds and a few hundred steps the two arms differ by noise; the point is the
pipeline (see docs/lerobot.md). Pass ``--steps`` for longer runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors

from ate_fast import Steer
from ate_fast.align import KIND_STAGE2, load_checkpoint
from ate_fast.cli import main as ate_fast_cli
from ate_fast.integrations.lerobot import patch_policy, steer_policy, vae_spec

ROTATION_B = np.deg2rad(120.0)
SCALE_B = 0.6
LENGTH = 40  # frames per episode


def _episode(rng: np.random.Generator, robot: str) -> list[dict]:
    """A point moving from a random start to a random goal with a smooth velocity."""
    pos, goal = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
    c, s = np.cos(ROTATION_B), np.sin(ROTATION_B)
    to_b = SCALE_B * np.array([[c, -s], [s, c]])
    frames = []
    for _ in range(LENGTH):
        velocity = np.clip(0.25 * (goal - pos), -0.1, 0.1) + rng.normal(0, 0.005, 2)
        action = velocity if robot == "A" else to_b @ velocity
        frames.append({
            "observation.state": pos.astype(np.float32),
            "observation.environment_state": goal.astype(np.float32),
            "action": action.astype(np.float32),
            "task": "reach",
        })  # fmt: skip
        pos = pos + velocity
    return frames


def make_dataset(root: Path, robot: str, episodes: int, seed: int) -> LeRobotDataset:
    features = {
        key: {"dtype": "float32", "shape": (2,), "names": None}
        for key in ("observation.state", "observation.environment_state", "action")
    }
    ds = LeRobotDataset.create(f"local/reach_{robot}", fps=10, features=features, root=root,
                               use_videos=False)  # fmt: skip
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        for frame in _episode(rng, robot):
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return ds


def policy_config(steps: int) -> DiffusionConfig:
    return DiffusionConfig(
        device="cpu", push_to_hub=False,
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
            "observation.environment_state": PolicyFeature(FeatureType.ENV, (2,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        horizon=16, n_obs_steps=2, n_action_steps=8, down_dims=(64, 128),
        diffusion_step_embed_dim=64, noise_scheduler_type="DDIM", num_inference_steps=10,
        optimizer_lr=1e-3, scheduler_warmup_steps=min(50, steps // 4),
    )  # fmt: skip


def align(out: Path, data_a: Path, data_b: Path, policy_dir: Path, epochs: int) -> Path:
    """The three align commands, in the policy's action space."""
    common = ["--lerobot-policy", str(policy_dir), "--arch", "mlp", "--hidden", "128,128",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    steps = [
        ["align", "stage1", "--data", str(data_a), "--out", str(out / "vae1"),
         "--latent-dim", "16", "--epochs", str(epochs), *common],
        ["align", "prior", "--vae", str(out / "vae1"), "--data", str(data_a),
         "--out", str(out / "prior.safetensors"), "--no-progress"],
        ["align", "stage2", "--prior", str(out / "prior.safetensors"), "--data", str(data_b),
         "--out", str(out / "vae2"), "--epochs", str(4 * epochs), *common[:2],
         "--device", "cpu", "--no-progress"],
    ]  # fmt: skip
    for argv in steps:
        print("ate-fast " + " ".join(argv))
        if ate_fast_cli(argv) != 0:
            raise SystemExit(f"ate-fast {' '.join(argv[:2])} failed")
    return out / "vae2"


def train(cfg: DiffusionConfig, data_b: Path, steps: int, steer: Steer | None, seed: int):
    """LeRobot's data pipeline and training step, with or without Steer."""
    from accelerate import Accelerator
    from lerobot.scripts.lerobot_train import update_policy
    from lerobot.utils.logging_utils import AverageMeter, MetricsTracker

    ds = LeRobotDataset("local/reach_B", root=data_b,
                        delta_timestamps=resolve_delta_timestamps(cfg, LeRobotDataset(
                            "local/reach_B", root=data_b).meta))  # fmt: skip
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg)
    processors = make_pre_post_processors(cfg, dataset_stats=ds.meta.stats)
    preprocessor = processors[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optimizer_lr)
    meters = {n: AverageMeter(n) for n in ("loss", "grad_norm", "lr", "update_s")}
    tracker = MetricsTracker(32, ds.num_frames, ds.num_episodes, meters)
    accelerator = Accelerator(cpu=True)
    patch = steer_policy(policy, steer) if steer is not None else None
    done = 0
    while done < steps:
        for batch in loader:
            tracker, _ = update_policy(tracker, policy, preprocessor(batch), optimizer,
                                       10.0, accelerator)  # fmt: skip
            done += 1
            if done == steps:
                break
    if patch is not None:
        diagnostics = {k: round(float(v), 4) for k, v in patch.diagnostics.items()}
        print(f"  Steer diagnostics: {diagnostics}")
        patch.remove()
    print(f"  final loss {tracker.loss.val:.4f}")
    return policy.eval(), processors


def evaluate(policy, processors, episodes: int, seed: int) -> float:
    """Mean squared error of the executed actions (robot B's units) vs fresh B demos."""
    preprocessor, postprocessor = processors
    rng = np.random.default_rng(seed + 1000)
    errors = []
    with patch_policy(policy, capture=True):
        for _ in range(episodes):
            frames = _episode(rng, "B")
            policy.reset()
            torch.manual_seed(seed)
            for t in range(0, LENGTH - 8, 8):
                obs = {k: torch.from_numpy(frames[t][k])[None] for k in
                       ("observation.state", "observation.environment_state")}  # fmt: skip
                obs = preprocessor({**obs, "task": "reach"})
                policy.reset()
                for _ in range(2):  # fill the n_obs_steps = 2 observation queue
                    action = policy.select_action(dict(obs))
                action = postprocessor(action)
                target = torch.from_numpy(frames[t]["action"])[None]
                errors.append(float(((action - target) ** 2).mean()))
    return float(np.mean(errors))


def run(out: Path, steps: int, epochs: int, seed: int) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    data_a = make_dataset(out / "A", "A", episodes=60, seed=seed).root
    data_b = make_dataset(out / "B", "B", episodes=8, seed=seed + 1).root
    cfg = policy_config(steps)
    DiffusionPolicy(cfg).save_pretrained(out / "policy")  # the config the VAEs follow
    vae2 = load_checkpoint(align(out, data_a, data_b, out / "policy", epochs), kind=KIND_STAGE2)
    spec = vae_spec(DiffusionPolicy(cfg))
    results = {}
    for name, steer in (("direct", None), ("steer", Steer.recommended(vae2.vae, mask=spec.mask()))):
        print(f"fine-tuning on robot B ({name}, {steps} steps)")
        policy, processors = train(cfg, data_b, steps, steer, seed)
        results[name] = evaluate(policy, processors, episodes=4, seed=seed)
        print(f"  held-out action MSE: {results[name]:.6f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("lerobot_ate_out"))
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per arm")
    parser.add_argument("--epochs", type=int, default=20, help="stage-1 epochs (stage 2: 4x)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.out, args.steps, args.epochs, args.seed)


if __name__ == "__main__":
    main()
