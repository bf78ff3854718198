"""ATE Align: action-chunk VAEs, the InfoVAE losses, the stage-1 latent prior, and the
stage-1 / stage-2 trainers (ATE_METHOD.md, "Stage 1" and "Stage 2").

Names load on first use, so ``import ate_fast.align.cli`` (what ``ate-fast --help`` does)
imports only argparse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ate_fast.lazy_exports import lazy_attributes

_EXPORTS = {
    "ActionVAE": "vae",
    "VAEOutput": "vae",
    "ARCHS": "vae",
    "LatentPrior": "prior",
    "PRIOR_KINDS": "prior",
    "DEFAULT_BETA": "losses",
    "DEFAULT_GAMMA": "losses",
    "LossTerms": "losses",
    "gaussian_kl": "losses",
    "imq_kernel": "losses",
    "kl_loss": "losses",
    "mmd_imq": "losses",
    "monte_carlo_kl": "losses",
    "reconstruction_loss": "losses",
    "stage1_loss": "losses",
    "stage2_loss": "losses",
    "standard_normal_kl": "losses",
    "TrainConfig": "config",
    "Stage1Config": "config",
    "Stage2Config": "config",
    "TrainResult": "trainer",
    "train_stage1": "trainer",
    "train_stage2": "trainer",
    "AlignCheckpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = [
    "ARCHS",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "PRIOR_KINDS",
    "ActionVAE",
    "AlignCheckpoint",
    "CheckpointError",
    "LatentPrior",
    "LossTerms",
    "Stage1Config",
    "Stage2Config",
    "TrainConfig",
    "TrainResult",
    "VAEOutput",
    "gaussian_kl",
    "imq_kernel",
    "kl_loss",
    "load_checkpoint",
    "mmd_imq",
    "monte_carlo_kl",
    "reconstruction_loss",
    "save_checkpoint",
    "stage1_loss",
    "stage2_loss",
    "standard_normal_kl",
    "train_stage1",
    "train_stage2",
]


__getattr__, __dir__ = lazy_attributes(
    globals(), {name: f"ate_fast.align.{module}" for name, module in _EXPORTS.items()}
)


if TYPE_CHECKING:  # for type checkers and IDEs
    from ate_fast.align.checkpoint import (
        AlignCheckpoint,
        CheckpointError,
        load_checkpoint,
        save_checkpoint,
    )
    from ate_fast.align.config import Stage1Config, Stage2Config, TrainConfig
    from ate_fast.align.losses import (
        DEFAULT_BETA,
        DEFAULT_GAMMA,
        LossTerms,
        gaussian_kl,
        imq_kernel,
        kl_loss,
        mmd_imq,
        monte_carlo_kl,
        reconstruction_loss,
        stage1_loss,
        stage2_loss,
        standard_normal_kl,
    )
    from ate_fast.align.prior import PRIOR_KINDS, LatentPrior
    from ate_fast.align.trainer import TrainResult, train_stage1, train_stage2
    from ate_fast.align.vae import ARCHS, ActionVAE, VAEOutput
