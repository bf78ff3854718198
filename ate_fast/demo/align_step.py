"""ATE Align on the demo's data (the shared :mod:`ate_fast.adaptation.align_step`):
stage-1 VAE on robot A's chunks, the stage-1 latent prior, stage-2 VAE on robot B's chunks
against that prior (reverse KL, the paper's default), and the mean stage-2 latent (the
inference-time guidance target)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ate_fast.adaptation.align_step import align_source, align_target, new_chunk_vae
from ate_fast.adaptation.chunks import ChunkData
from ate_fast.align import ActionVAE, LatentPrior
from ate_fast.demo.config import DemoConfig
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


def run_align(
    a_data: ChunkData, b_data: ChunkData, cfg: DemoConfig, progress: bool, verbose: bool
) -> AlignResult:
    """Stage 1 → prior → stage 2 (and the stage-2 latents' mean). The trainers' epoch
    lines go to ``log``, or to stdout when ``verbose``."""
    settings = cfg.align_settings(progress)
    sink = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    with quiet:
        vae1 = new_chunk_vae(ACTION_DIM, cfg.horizon, settings, cfg.seed_for(6))
        source = align_source(
            vae1, a_data.vae_dataset(), settings, seed=cfg.seed_for(8), prior_seed=cfg.seed_for(9)
        )
        vae2 = new_chunk_vae(ACTION_DIM, cfg.horizon, settings, cfg.seed_for(7))
        target = align_target(
            vae2, b_data.vae_dataset(), source.prior, settings, seed=cfg.seed_for(8)
        )
    stats = {
        "stage1_steps": source.stats["steps"],
        "stage1_val_recon": source.stats["val_recon"],
        "stage2_steps": target.stats["steps"],
        "stage2_train_recon": target.stats["recon"],
        "stage2_train_prior_logp": target.stats["prior_logp"],
        "prior": source.stats["prior"],
    }
    return AlignResult(vae1, source.prior, vae2, target.mean.to(cfg.device), stats, sink.getvalue())
