"""The align step's settings (a plain dataclass: importing it loads no training code)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AlignSettings:
    """Sizes and settings of ATE Align as the adaptation pipelines run it.

    MLP action VAEs with ``latent_dim`` and ``hidden`` widths; AdamW at ``lr`` decaying to
    a tenth over each stage; stage 1 for ``stage1_epochs`` at ``stage1_batch``, stage 2 for
    ``stage2_epochs`` at ``stage2_batch`` (at most the number of target chunks); the
    stage-1 latent prior of kind ``prior``; fp32 on ``device``, no files, validation (if
    any) once at the end; ``progress`` bars or not.
    """

    latent_dim: int
    hidden: tuple[int, ...]
    lr: float
    stage1_epochs: int
    stage1_batch: int
    stage2_epochs: int
    stage2_batch: int
    prior: str = "gaussian"
    device: str = "cpu"
    progress: bool = False
