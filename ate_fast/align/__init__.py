"""ATE Align: action-chunk VAEs, the InfoVAE losses, the stage-1 latent prior, and the
stage-1 / stage-2 trainers (ATE_METHOD.md, "Stage 1" and "Stage 2").

Names load on first use, so ``import ate_fast.align.cli`` (what ``ate-fast --help`` does)
imports only argparse.
"""

from __future__ import annotations

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
    "CheckpointError": "errors",
    "CheckpointKindError": "errors",
    "CheckpointIntegrityError": "errors",
    "KIND_STAGE1": "checkpoint",
    "KIND_STAGE2": "checkpoint",
    "read_checkpoint_config": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes(
    globals(), {name: f"ate_fast.align.{module}" for name, module in _EXPORTS.items()}
)
