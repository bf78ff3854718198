"""ATE Align for the benchmark (the shared :mod:`ate_fast.adaptation.align_step`): the
stage-1 VAE and its latent prior on the pre-training robot's chunks, stage-2 VAEs on a
target robot's demos, and the mean stage-2 latent (inference-time guidance's target).

Each call leaves the caller's global RNG as it was and prints nothing."""

from __future__ import annotations

import contextlib
import io

import torch

from ate_fast.adaptation.align_step import align_source, align_target, new_chunk_vae
from ate_fast.align import ActionVAE, LatentPrior
from ate_fast.eval.metaworld.config import EvalConfig
from ate_fast.eval.metaworld.embodiment import ACTION_DIM
from ate_fast.eval.metaworld.experts import ChunkSet


def new_vae(cfg: EvalConfig, seed: int) -> ActionVAE:
    """A freshly initialised MLP ActionVAE (weights from ``seed``)."""
    return new_chunk_vae(ACTION_DIM, cfg.horizon, cfg.align_settings(), seed)


def train_source_vae(
    cfg: EvalConfig, data: ChunkSet, seed: int
) -> tuple[ActionVAE, LatentPrior, dict]:
    """Stage 1 on the pre-training chunks, then the stage-1 latent prior (``cfg.prior``);
    ``(vae, prior, stats)``."""
    vae = new_vae(cfg, seed)
    with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
        source = align_source(
            vae, data.vae_dataset(), cfg.align_settings(), seed=seed, prior_seed=seed
        )
    return vae, source.prior, source.stats


def train_target_vae(
    cfg: EvalConfig, data: ChunkSet, prior: LatentPrior, kl: str, seed: int
) -> tuple[ActionVAE, torch.Tensor, dict]:
    """Stage 2 on all of the target demos against ``prior`` with ``kl`` direction;
    ``(vae, mean stage-2 latent [d_z], stats)``."""
    vae = new_vae(cfg, seed)
    with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
        target = align_target(
            vae, data.vae_dataset(), prior, cfg.align_settings(), seed=seed, kl=kl
        )
    return vae, target.mean.float(), target.stats
