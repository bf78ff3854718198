"""Training configuration for the two Align stages (defaults: the paper / released code)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from ate_fast.align.losses import DEFAULT_BETA, DEFAULT_GAMMA, KL_DIRECTIONS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings shared by both stages.

    Optimisation (paper / released code): AdamW ``lr=1e-4``, ``weight_decay=1e-4``,
    global ``batch_size=64`` (split evenly over ``torchrun`` ranks), ExponentialLR
    ``lr_gamma=0.95`` per epoch floored at ``lr_floor=1e-6``; loss weights ``beta=7.5e-5``,
    ``gamma=1``. ``grad_clip`` (max global L2 norm; ``None`` = off, as in the released
    code) is an addition for stability.

    ``precision``: ``"auto"`` is bf16 autocast on a GPU that supports it (else fp16 with
    a gradient scaler) and fp32 on CPU; losses are always computed in fp32.

    Checkpoints go to ``out_dir`` (nothing is written when it is ``None``): the model
    after every ``save_every_epochs`` epochs / ``save_every_steps`` steps /
    ``save_every_minutes`` minutes (whichever are set) and at the end, with a resume state
    so that ``resume=True`` continues a killed run exactly. ``max_steps`` stops early
    (and saves) after that many optimiser steps in total.
    """

    out_dir: Optional[str] = None
    epochs: int = 500
    max_steps: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_gamma: float = 0.95
    lr_floor: float = 1e-6
    grad_clip: Optional[float] = 1.0
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA
    val_fraction: float = 0.1
    val_every: int = 1
    seed: int = 0
    num_workers: int = 0
    precision: str = "auto"
    device: Optional[str] = None
    save_every_epochs: Optional[int] = None
    save_every_steps: Optional[int] = None
    save_every_minutes: Optional[float] = 10.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    log_every_steps: int = 50

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        positive = ["epochs", "batch_size", "val_every", "log_every_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        # `not (value > 0 ...)`: NaN fails every comparison, so `value <= 0` let it through;
        # ±inf is no learning rate, weight or interval either
        optional_positive = ["max_steps", "save_every_epochs", "save_every_steps", "grad_clip"]
        for name in [*optional_positive, "save_every_minutes"]:
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite value > 0 or None, got {value}")
        for name in ("lr", "lr_gamma", "lr_floor"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite value > 0, got {value}")
        for name in ("weight_decay", "beta", "gamma", "num_workers"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite value >= 0, got {value}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a value in [0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision: expected one of {list(PRECISIONS)}, got {self.precision!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1 (pre-training latent space). ``epochs=500`` as in the released config."""

    epochs: int = 500


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2 (adaptation latent space). ``epochs=4000`` as in the released config.

    ``kl``: ``"reverse"`` (paper, default) or ``"forward"`` (released code).
    ``kl_samples``: Monte-Carlo draws per chunk for the KL to a mixture prior.
    ``init_from``: a stage-1 checkpoint directory whose weights start stage 2 (the
    architectures must match); fresh initialisation when ``None``.
    """

    epochs: int = 4000
    kl: str = "reverse"
    kl_samples: int = 8
    init_from: Optional[str] = None

    def validate(self) -> None:
        super().validate()
        if self.kl not in KL_DIRECTIONS:
            raise ValueError(f"kl: expected one of {list(KL_DIRECTIONS)}, got {self.kl!r}")
        if self.kl_samples < 1:
            raise ValueError(f"kl_samples: expected >= 1, got {self.kl_samples}")
