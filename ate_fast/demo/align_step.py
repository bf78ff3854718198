"""ATE Align on the demo's data, through ``ate_fast.align``: stage-1 VAE on robot A's
chunks, the stage-1 latent prior, stage-2 VAE on robot B's chunks against that prior
(reverse KL, the paper's default), and the mean stage-2 latent (the inference-time
guidance target)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ate_fast.align import (
    ActionVAE,
    LatentPrior,
    Stage1Config,
    Stage2Config,
    train_stage1,
    train_stage2,
)
from ate_fast.demo.config import DemoConfig
from ate_fast.demo.demonstrations import ChunkData
from ate_fast.demo.embodiment import ACTION_DIM


@dataclass
class AlignResult:
    """``vae1``/``vae2``: the stage-1 and stage-2 VAEs; ``prior``: the stage-1 latent prior
    (``LatentPrior``); ``target [d_z]``: the mean stage-2 latent of robot B's chunks;
    ``stats``: numbers for the report; ``log``: the trainers' per-epoch lines."""

    vae1: ActionVAE
    prior: LatentPrior
    vae2: ActionVAE
    target: Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    log: str = ""


def _train_config(cls: type, cfg: DemoConfig, epochs: int, batch: int, progress: bool, **kw):
    """Trainer settings for the demo: no files, lr decaying to a tenth over the run,
    validation (if any) once at the end."""
    return cls(
        epochs=epochs,
        batch_size=batch,
        lr=cfg.vae_lr,
        lr_gamma=0.1 ** (1.0 / epochs),
        seed=cfg.seed_for(8),
        device=cfg.device,
        precision="fp32",
        val_every=epochs,
        save_every_minutes=None,
        progress=progress,
        **kw,
    )


def _new_vae(cfg: DemoConfig) -> ActionVAE:
    return ActionVAE(
        ACTION_DIM, cfg.horizon, cfg.latent_dim, arch="mlp", hidden_dims=cfg.vae_hidden
    )


def run_align(
    a_data: ChunkData, b_data: ChunkData, cfg: DemoConfig, progress: bool, verbose: bool
) -> AlignResult:
    """Stage 1 → prior → stage 2 (and the stage-2 latents' mean). The trainers' epoch
    lines go to ``log``, or to stdout when ``verbose``."""
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    with quiet:
        torch.manual_seed(cfg.seed_for(6))
        vae1 = _new_vae(cfg)
        s1 = train_stage1(
            vae1,
            a_data.vae_dataset(),
            _train_config(Stage1Config, cfg, cfg.stage1_epochs, cfg.stage1_batch, progress),
        )
        prior = LatentPrior.fit(
            vae1,
            a_data.vae_dataset(),
            kind=cfg.prior,
            device=cfg.device,
            seed=cfg.seed_for(9),
            progress=progress,
        )
        torch.manual_seed(cfg.seed_for(7))
        vae2 = _new_vae(cfg)
        s2 = train_stage2(
            vae2,
            b_data.vae_dataset(),
            prior,
            # all of B's demonstrations, as direct fine-tuning gets them: no validation split
            _train_config(
                Stage2Config,
                cfg,
                cfg.stage2_epochs,
                min(cfg.stage2_batch, len(b_data)),
                progress,
                kl="reverse",
                val_fraction=0.0,
            ),
        )
        adaptation = LatentPrior.fit(
            vae2, b_data.vae_dataset(), kind="gaussian", device=cfg.device, progress=progress
        )
    last1, last2 = s1.history[-1], s2.history[-1]
    stats = {
        "stage1_steps": last1["global_step"],
        "stage1_val_recon": last1.get("val_recon_mu"),
        "stage2_steps": last2["global_step"],
        "stage2_train_recon": last2["recon"],
        "stage2_train_prior_logp": last2["prior_logp"],
        "prior": prior.describe(),
    }
    return AlignResult(vae1, prior, vae2, adaptation.mean.to(cfg.device), stats, sink.getvalue())
