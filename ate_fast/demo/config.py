"""The demo's sizes and settings: the default run and the ``--quick`` one (for tests)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ate_fast.adaptation.settings import AlignSettings

MAX_FINETUNE_RUNS = 10  # seed_for(10 + run) must not reach the next purpose block


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does is set here; ``seed`` and ``device`` come from the CLI.

    Data: ``pretrain_episodes`` of robot A, ``demos`` of robot B, ``eval_episodes`` of
    ``episode_steps`` steps each (receding horizon: a chunk of ``horizon`` actions is
    sampled, its first ``exec_steps`` are executed). Policy: a flattened ``MLPHead``
    (``policy_hidden`` × ``policy_depth``), flow matching, ``flow_steps`` Euler steps.
    Fine-tuning on robot B is repeated ``finetune_runs`` times with different batch and
    noise seeds (the demonstrations and the pre-trained policy stay the same); within a
    run, direct and Steer fine-tuning see the same batches and rollout noise.
    Align: MLP VAEs with ``latent_dim`` and ``vae_hidden``. Steer: λ = ``steer_scale``,
    κ = ``steer_clamp``, per-sample normalisation, as in the paper; inference-time
    guidance uses ``guidance_scale``/``guidance_clamp`` toward the mean stage-2 latent.
    """

    seed: int = 0
    device: str = "cpu"
    # data and environment
    horizon: int = 8
    exec_steps: int = 4
    episode_steps: int = 80
    pretrain_episodes: int = 400
    demos: int = 10
    eval_episodes: int = 200
    # policy
    policy_hidden: int = 384
    policy_depth: int = 4
    flow_steps: int = 10
    pretrain_steps: int = 3000
    pretrain_batch: int = 256
    pretrain_lr: float = 1e-3
    finetune_steps: int = 1000
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    finetune_runs: int = 3
    # align
    latent_dim: int = 8
    vae_hidden: tuple[int, ...] = (128, 128)
    vae_lr: float = 1e-3
    stage1_epochs: int = 15
    stage1_batch: int = 256
    stage2_epochs: int = 100
    stage2_batch: int = 64
    prior: str = "gaussian"
    # steer
    steer_scale: float = 2.0
    steer_clamp: float = 0.1
    guidance_scale: float = 2.0
    guidance_clamp: float = 0.1
    # latency
    latency_repeats: int = 100
    quick: bool = False

    def __post_init__(self) -> None:
        counts = [f.name for f in fields(self) if f.type in ("int", int) and f.name != "seed"]
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {self.seed!r}")
        if self.exec_steps > self.horizon:
            raise ValueError(
                f"exec_steps: at most horizon={self.horizon} actions of a chunk can be executed, "
                f"got {self.exec_steps}"
            )
        if self.finetune_runs > MAX_FINETUNE_RUNS:
            raise ValueError(
                f"finetune_runs: expected at most {MAX_FINETUNE_RUNS}, got {self.finetune_runs}"
            )
        if self.prior not in ("gaussian", "gaussian-code", "gmm"):
            raise ValueError(
                f"prior: expected 'gaussian', 'gaussian-code' or 'gmm', got {self.prior!r}"
            )

    @classmethod
    def quick_run(cls, **overrides: Any) -> DemoConfig:
        """Tiny sizes for tests: seconds, same code paths, meaningless numbers."""
        small = dict(
            pretrain_episodes=12,
            demos=3,
            eval_episodes=8,
            policy_hidden=32,
            policy_depth=2,
            flow_steps=3,
            pretrain_steps=20,
            pretrain_batch=32,
            finetune_steps=10,
            finetune_batch=16,
            finetune_runs=2,
            latent_dim=4,
            vae_hidden=(32,),
            stage1_epochs=2,
            stage1_batch=64,
            stage2_epochs=2,
            stage2_batch=16,
            latency_repeats=3,
            quick=True,
        )
        return replace(cls(), **{**small, **overrides})

    def seed_for(self, purpose: int) -> int:
        """The seed of one random stream of the run (``0 <= purpose < 100``): distinct for
        every purpose and every ``seed``."""
        if not 0 <= purpose < 100:
            raise ValueError(f"purpose: expected 0 <= purpose < 100, got {purpose}")
        return 100 * self.seed + purpose

    def align_settings(self, progress: bool) -> AlignSettings:
        """The align step's settings (both stages on ``device``)."""
        return AlignSettings(
            latent_dim=self.latent_dim,
            hidden=self.vae_hidden,
            lr=self.vae_lr,
            stage1_epochs=self.stage1_epochs,
            stage1_batch=self.stage1_batch,
            stage2_epochs=self.stage2_epochs,
            stage2_batch=self.stage2_batch,
            prior=self.prior,
            device=self.device,
            progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["vae_hidden"] = list(self.vae_hidden)
        return out
