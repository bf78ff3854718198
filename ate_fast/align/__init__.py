"""ATE Align: action-chunk VAEs, the InfoVAE losses, the stage-1 latent prior, and the
stage-1 / stage-2 trainers (ATE_METHOD.md, "Stage 1" and "Stage 2")."""

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
