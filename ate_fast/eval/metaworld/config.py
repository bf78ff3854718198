"""Settings of the Meta-World cross-embodiment benchmark: named configurations
(``smoke``, ``quick``, ``full``) and the methods it compares.

Every method starts from the same pre-trained policy (except ``scratch``), sees the same
demonstrations and the same batches (one generator seed per run), and is evaluated on
the same layouts with the same sampling noise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from ate_fast.adaptation.settings import AlignSettings
from ate_fast.eval.metaworld.embodiment import SHIFTS
from ate_fast.eval.metaworld.envs import MAX_EPISODE_STEPS

POLICY_KINDS = ("flow", "diffusion")


@dataclass(frozen=True)
class Method:
    """How a run fine-tunes and samples.

    ``init``: ``"pretrained"`` or ``"scratch"``; ``steer``: None (plain loss) or the
    Steer settings (``scale`` λ — negative flips the correction's sign —, ``reduction``,
    ``encoder``: ``"stage2"`` (the adaptation VAE), ``"untrained"`` (a freshly initialised
    VAE: the control), ``"stage2-forward-kl"`` (stage 2 trained with the released code's
    forward KL)); ``guided``: inference-time latent guidance toward the mean stage-2 latent.
    ``trains``: the name of the method whose fine-tuned policy this one reuses.
    """

    name: str
    description: str
    init: str = "pretrained"
    steer: Optional[dict[str, Any]] = None
    guided: bool = False
    trains: Optional[str] = None

    @property
    def training(self) -> str:
        return self.trains or self.name


def _steer(
    scale: float = 2.0,
    reduction: str = "sample",
    encoder: str = "stage2",
    clamp: Optional[float] = None,
) -> dict:
    """Steer settings; ``clamp`` None takes the config's ``steer_clamp``."""
    return {"scale": scale, "reduction": reduction, "encoder": encoder, "clamp": clamp}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "scratch", "no pre-training: trained from scratch on the target demos", init="scratch"
        ),
        Method("direct", "direct fine-tuning (plain flow/diffusion loss)"),
        Method("ate", "ATE Steer as specified (reduction='sample', λ=2, κ=0.1)", steer=_steer()),
        Method(
            "ate-batch",
            "ATE Steer with the released code's reduction='batch'",
            steer=_steer(reduction="batch"),
        ),
        Method(
            "ate-flipped", "ATE Steer with the correction's sign flipped (λ=−2)", steer=_steer(-2.0)
        ),
        Method(
            "ate-untrained",
            "ATE Steer through an untrained encoder (control)",
            steer=_steer(encoder="untrained"),
        ),
        Method(
            "ate-forward-kl",
            "ATE Steer, stage 2 trained with forward KL (released code)",
            steer=_steer(encoder="stage2-forward-kl"),
        ),
        Method(
            "direct+guided",
            "direct fine-tuning, then inference-time steering toward the mean stage-2 latent",
            guided=True,
            trains="direct",
        ),
        Method(
            "ate+guided",
            "ATE Steer in training and inference-time steering (the consistent sampler)",
            steer=_steer(),
            guided=True,
            trains="ate",
        ),
        # λ/κ ablation around the flipped sign (the only variant that helped in `quick`)
        Method("ate-flipped-l1", "flipped sign, λ=−1", steer=_steer(-1.0)),
        Method("ate-flipped-l4", "flipped sign, λ=−4", steer=_steer(-4.0)),
        Method("ate-flipped-k03", "flipped sign, λ=−2, κ=0.3", steer=_steer(-2.0, clamp=0.3)),
        Method("ate-l4", "the specified sign, λ=4", steer=_steer(4.0)),
    )
}
MAIN_METHODS = tuple(m for m in METHODS if not m.startswith(("ate-flipped-", "ate-l")))

SOURCE_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "window-open-v3",
    "window-close-v3",
    "coffee-push-v3",
    "lever-pull-v3",
    "peg-unplug-side-v3",
)
HARD_TARGETS = (
    "pick-place-wall-v3",
    "basketball-v3",
    "peg-insert-side-v3",
    "shelf-place-v3",
    "hammer-v3",
    "bin-picking-v3",
    "assembly-v3",
    "sweep-into-v3",
)


@dataclass(frozen=True)
class EvalConfig:
    """One benchmark configuration. Sizes are per task unless said otherwise.

    Data: ``pretrain_demos`` expert episodes per source task; ``demos`` (the N values)
    per target task. Policy: chunk ``horizon``, ``exec_steps`` executed per replanning,
    ``sampler_steps``; fine-tuning ``finetune_steps`` at ``finetune_batch``. Evaluation:
    ``eval_episodes`` per target task, at most ``episode_steps`` steps each.
    """

    name: str
    source_tasks: tuple[str, ...] = SOURCE_TASKS
    target_tasks: tuple[str, ...] = HARD_TARGETS[:3]
    shifts: tuple[str, ...] = ("linear", "warp")
    policies: tuple[str, ...] = ("flow",)
    methods: tuple[str, ...] = MAIN_METHODS
    demos: tuple[int, ...] = (5,)
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_demos: int = 25
    horizon: int = 8
    exec_steps: int = 4
    sampler_steps: int = 10
    policy_hidden: int = 512
    policy_depth: int = 3
    pretrain_steps: int = 12000
    pretrain_batch: int = 256
    pretrain_lr: float = 1e-3
    finetune_steps: int = 8000
    finetune_batch: int = 64
    finetune_lr: float = 3e-4
    latent_dim: int = 16
    vae_hidden: tuple[int, ...] = (256, 256)
    vae_lr: float = 1e-3
    stage1_epochs: int = 20
    stage2_epochs: int = 200
    vae_batch: int = 128
    prior: str = "gaussian"
    steer_clamp: float = 0.1
    guidance_scale: float = 2.0
    guidance_clamp: float = 0.1
    eval_episodes: int = 30
    episode_steps: int = 300
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("shifts", "policies", "methods"):
            allowed = {"shifts": SHIFTS, "policies": POLICY_KINDS, "methods": tuple(METHODS)}[name]
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(
                    f"{name}: expected a non-empty subset of {list(allowed)}, "
                    f"got {list(getattr(self, name))}"
                )
        if "source" in self.shifts:
            raise ValueError("shifts: 'source' is the pre-training robot, not a target embodiment")
        overlap = set(self.source_tasks) & set(self.target_tasks)
        if overlap:
            raise ValueError(
                f"target_tasks: must be held out of source_tasks, both hold {sorted(overlap)}"
            )
        if not 1 <= self.exec_steps <= self.horizon:
            raise ValueError(
                f"exec_steps: expected 1..horizon={self.horizon}, got {self.exec_steps}"
            )
        if not 1 <= self.episode_steps <= MAX_EPISODE_STEPS:
            raise ValueError(
                f"episode_steps: expected 1..{MAX_EPISODE_STEPS}, got {self.episode_steps}"
            )
        if any(n < 1 for n in self.demos) or any(s < 0 for s in self.seeds):
            raise ValueError(f"demos must be ≥ 1 and seeds ≥ 0, got {self.demos}, {self.seeds}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task the policy knows (one-hot slot order): sources, then targets."""
        return self.source_tasks + self.target_tasks

    def align_settings(self) -> AlignSettings:
        """The align step's settings: both stages at ``vae_batch``, on the CPU, quietly."""
        return AlignSettings(
            latent_dim=self.latent_dim,
            hidden=self.vae_hidden,
            lr=self.vae_lr,
            stage1_epochs=self.stage1_epochs,
            stage1_batch=self.vae_batch,
            stage2_epochs=self.stage2_epochs,
            stage2_batch=self.vae_batch,
            prior=self.prior,
        )

    def with_overrides(self, **overrides: Any) -> EvalConfig:
        known = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown config fields {bad}; known: {sorted(known)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self, *names: str) -> str:
        """A short hash of the named fields (what a cached artefact depends on)."""
        data = {n: getattr(self, n) for n in names}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()[
            :12
        ]


CONFIGS: dict[str, EvalConfig] = {
    # the CI smoke test: tiny networks, one target, a few hundred steps, two episodes
    "smoke": EvalConfig(
        "smoke",
        source_tasks=("reach-v3", "push-v3"),
        target_tasks=("pick-place-wall-v3",),
        shifts=("linear",),
        methods=("direct", "ate", "direct+guided"),
        demos=(2,),
        seeds=(0,),
        pretrain_demos=2,
        sampler_steps=3,
        policy_hidden=32,
        policy_depth=1,
        pretrain_steps=50,
        pretrain_batch=32,
        finetune_steps=30,
        finetune_batch=16,
        latent_dim=4,
        vae_hidden=(32,),
        stage1_epochs=1,
        stage2_epochs=2,
        vae_batch=32,
        eval_episodes=2,
        episode_steps=20,
    ),
    # about 20 minutes on 2 CPU cores: the pilot's targets, N = 5, both shift families
    "quick": EvalConfig(
        "quick",
        methods=("direct", "ate", "ate-batch", "ate-flipped", "direct+guided", "ate+guided"),
    ),
    # λ and κ around the flipped sign, on quick's setting (linear shift, N = 5)
    "ablation": EvalConfig(
        "ablation",
        shifts=("linear",),
        methods=(
            "direct",
            "ate-flipped",
            "ate-flipped-l1",
            "ate-flipped-l4",
            "ate-flipped-k03",
            "ate-l4",
        ),
    ),
    # the whole protocol (hours; see docs/results/metaworld.md for the expected time)
    "full": EvalConfig(
        "full",
        methods=MAIN_METHODS,
        target_tasks=HARD_TARGETS[:6],
        shifts=("linear", "warp", "absolute"),
        policies=("flow", "diffusion"),
        demos=(5, 20),
        seeds=(0, 1, 2),
    ),
}
