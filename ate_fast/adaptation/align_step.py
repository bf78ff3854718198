"""ATE Align as a step of the adaptation pipeline, through ``ate_fast.align``: the stage-1
VAE and its latent prior on the source robot's chunks, the stage-2 VAE on the target
robot's chunks against that prior, and the mean stage-2 latent (inference-time
guidance's target).

The trainers reseed the global RNG (``Stage1Config.seed``): callers that need theirs
kept fork it around :func:`align_source` / :func:`align_target`. They print one line per
epoch; callers redirect stdout to keep or drop them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ate_fast.adaptation.settings import AlignSettings
from ate_fast.align import (
    ActionVAE,
    LatentPrior,
    Stage1Config,
    Stage2Config,
    TrainConfig,
    train_stage1,
    train_stage2,
)
from ate_fast.errors import InvalidArgumentError


def new_chunk_vae(action_dim: int, horizon: int, settings: AlignSettings, seed: int) -> ActionVAE:
    """A freshly initialised MLP ``ActionVAE`` over ``[horizon, action_dim]`` chunks, its
    weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ActionVAE(
            action_dim, horizon, settings.latent_dim, arch="mlp", hidden_dims=settings.hidden
        )


def _trainer_config(
    cls: type[TrainConfig], settings: AlignSettings, epochs: int, batch: int, seed: int, **kw: Any
) -> TrainConfig:
    """No files, lr decaying to a tenth over the run, fp32, validation (if any) once at
    the end."""
    return cls(
        epochs=epochs,
        batch_size=batch,
        lr=settings.lr,
        lr_gamma=0.1 ** (1.0 / epochs),
        seed=seed,
        device=settings.device,
        precision="fp32",
        val_every=epochs,
        save_every_minutes=None,
        progress=settings.progress,
        **kw,
    )


@dataclass
class SourceAlignment:
    """``prior``: the stage-1 latent prior; ``stats``: ``steps`` (optimiser steps),
    ``val_recon`` (validation reconstruction at the latent mean), ``prior`` (its
    description)."""

    prior: LatentPrior
    stats: dict[str, Any]


@dataclass
class TargetAlignment:
    """``mean [d_z]``: the mean stage-2 latent of the target chunks; ``stats``: ``steps``,
    ``recon`` and ``prior_logp`` of the last epoch."""

    mean: Tensor
    stats: dict[str, Any]


def align_source(
    vae: ActionVAE, data: Dataset, settings: AlignSettings, *, seed: int, prior_seed: int
) -> SourceAlignment:
    """Stage 1: train ``vae`` in place on the source chunks ``data`` (items ``(chunk
    [H, D], mask [D])``; batches and noise from ``seed``), then fit the stage-1 latent
    prior (``settings.prior``; a GMM's EM from ``prior_seed``)."""
    fit = train_stage1(
        vae,
        data,
        _trainer_config(
            Stage1Config, settings, settings.stage1_epochs, settings.stage1_batch, seed
        ),
    )
    prior = LatentPrior.fit(
        vae,
        data,
        kind=settings.prior,
        device=settings.device,
        seed=prior_seed,
        progress=settings.progress,
    )
    last = fit.history[-1]
    stats = {
        "steps": last["global_step"],
        "val_recon": last.get("val_recon_mu"),
        "prior": prior.describe(),
    }
    return SourceAlignment(prior, stats)


def align_target(
    vae: ActionVAE,
    data: Dataset,
    prior: LatentPrior,
    settings: AlignSettings,
    *,
    seed: int,
    kl: str = "reverse",
) -> TargetAlignment:
    """Stage 2: train ``vae`` in place on all of the target chunks ``data`` against
    ``prior`` with ``kl`` direction (no validation split: direct fine-tuning gets every
    demonstration too), then the mean of its latents."""
    if len(data) == 0:
        raise InvalidArgumentError("data: no target chunks to align (an empty dataset)")
    batch = min(settings.stage2_batch, len(data))
    fit = train_stage2(
        vae,
        data,
        prior,
        _trainer_config(
            Stage2Config, settings, settings.stage2_epochs, batch, seed, kl=kl, val_fraction=0.0
        ),
    )
    latents = LatentPrior.fit(
        vae, data, kind="gaussian", device=settings.device, progress=settings.progress
    )
    last = fit.history[-1]
    stats = {"steps": last["global_step"], "recon": last["recon"], "prior_logp": last["prior_logp"]}
    return TargetAlignment(latents.mean, stats)
