"""ATE Align for the benchmark, through ``ate_fast.align``: the stage-1 VAE and its latent
prior on the pre-training robot's chunks, stage-2 VAEs on a target robot's demos, and
the mean stage-2 latent (inference-time guidance's target)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from ate_fast.align import (
    ActionVAE,
    LatentPrior,
    Stage1Config,
    Stage2Config,
    train_stage1,
    train_stage2,
)
from ate_fast.eval.metaworld.config import EvalConfig
from ate_fast.eval.metaworld.embodiment import ACTION_DIM
from ate_fast.eval.metaworld.experts import ChunkSet


def new_vae(cfg: EvalConfig, seed: int) -> ActionVAE:
    """A freshly initialised MLP ActionVAE (weights from ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ActionVAE(
            ACTION_DIM, cfg.horizon, cfg.latent_dim, arch="mlp", hidden_dims=cfg.vae_hidden
        )


def _settings(cls: type, cfg: EvalConfig, epochs: int, batch: int, seed: int, **kw: Any):
    """No files, lr decaying to a tenth over the run, fp32 on the CPU, no progress bars."""
    return cls(
        epochs=epochs,
        batch_size=batch,
        lr=cfg.vae_lr,
        lr_gamma=0.1 ** (1.0 / epochs),
        seed=seed,
        device="cpu",
        precision="fp32",
        val_every=epochs,
        save_every_minutes=None,
        progress=False,
        **kw,
    )


def train_source_vae(
    cfg: EvalConfig, data: ChunkSet, seed: int
) -> tuple[ActionVAE, LatentPrior, dict]:
    """Stage 1 on the pre-training chunks, then the stage-1 latent prior (``cfg.prior``)."""
    vae = new_vae(cfg, seed)
    with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
        fit = train_stage1(
            vae,
            data.vae_dataset(),
            _settings(Stage1Config, cfg, cfg.stage1_epochs, cfg.vae_batch, seed),
        )
        prior = LatentPrior.fit(
            vae, data.vae_dataset(), kind=cfg.prior, device="cpu", seed=seed, progress=False
        )
    last = fit.history[-1]
    return (
        vae,
        prior,
        {
            "steps": last["global_step"],
            "val_recon": last.get("val_recon_mu"),
            "prior": prior.describe(),
        },
    )


def train_target_vae(
    cfg: EvalConfig, data: ChunkSet, prior: LatentPrior, kl: str, seed: int
) -> tuple[ActionVAE, torch.Tensor, dict]:
    """Stage 2 on all of the target demos (no validation split: direct fine-tuning gets
    them all too) against ``prior`` with ``kl`` direction; the mean stage-2 latent [d_z]."""
    vae = new_vae(cfg, seed)
    batch = min(cfg.vae_batch, len(data))
    with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
        fit = train_stage2(
            vae,
            data.vae_dataset(),
            prior,
            _settings(Stage2Config, cfg, cfg.stage2_epochs, batch, seed, kl=kl, val_fraction=0.0),
        )
        latent = LatentPrior.fit(
            vae, data.vae_dataset(), kind="gaussian", device="cpu", progress=False
        )
    last = fit.history[-1]
    return (
        vae,
        latent.mean.float(),
        {"steps": last["global_step"], "recon": last["recon"], "prior_logp": last["prior_logp"]},
    )
