"""The demo's flow policy: a flattened ``MLPHead`` over the whole chunk, conditioned on the
observation, trained by the shared loop (:func:`~ate_fast.adaptation.train_chunk_policy`)
with openpi's flow matching, plainly or with the ATE Steer loss (``Steer.flow_loss``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ate_fast.adaptation.chunks import ChunkData
from ate_fast.adaptation.objectives import FlowMatching
from ate_fast.adaptation.policy_training import PolicyFit, train_chunk_policy
from ate_fast.demo.embodiment import ACTION_DIM
from ate_fast.demo.point_mass import OBS_DIM
from ate_fast.models import MLPHead, make_head
from ate_fast.steer import Steer


def make_policy(horizon: int, hidden: int, depth: int) -> MLPHead:
    """``MLPHead`` over the whole chunk: ``forward(x [B, H, D], t [B], obs [B, OBS_DIM])``."""
    return make_head(
        "mlp",
        "flat",
        horizon=horizon,
        action_dim=ACTION_DIM,
        hidden=hidden,
        depth=depth,
        cond_dim=OBS_DIM,
    )


def train_flow(
    policy: nn.Module,
    data: ChunkData,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device: torch.device,
    steer: Optional[Steer] = None,
    desc: str = "flow",
    progress: bool = True,
) -> PolicyFit:
    """Train ``policy`` in place on ``data``'s chunks given their observations for
    ``steps`` fused-AdamW steps (see ``train_chunk_policy``); two runs with the same
    ``seed`` see the same batches, noise and times."""
    return train_chunk_policy(
        policy,
        data.chunks,
        data.obs,
        data.mask,
        FlowMatching(),
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        steer=steer,
        device=device,
        fused=True,
        desc=desc,
        progress=progress,
    )
