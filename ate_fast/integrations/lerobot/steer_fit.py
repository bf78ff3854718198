"""Does a ``Steer`` fit the LeRobot policy it trains? Checked by ``steer_policy`` (once)
and by the steered losses (the device, every call: ``accelerator.prepare`` may move the
policy after it was patched).

A Steer that does not fit fails late and unclearly, or not at all: a VAE of another
horizon only at the first forward, with the encoder's shape error; a padded policy
(SmolVLA: ``max_action_dim`` 32, the robot's D_r dims first) steered without a mask
quietly gives the padding dims as much guidance as the robot's, in a loss that keeps
them; an encoder on the CPU beside a policy on the GPU with torch's device mismatch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ate_fast.errors import InvalidArgumentError
from ate_fast.integrations.lerobot.spec import VaeSpec


def _vae_shape(source: Any) -> Optional[tuple[int, int]]:
    """``(H, D)`` the encoder takes, when it says (an ``ActionVAE`` or its encoder)."""
    for obj in (source, getattr(source, "encoder", None)):
        horizon, width = getattr(obj, "horizon", None), getattr(obj, "action_dim", None)
        if isinstance(horizon, int) and isinstance(width, int):
            return horizon, width
    return None


def check_steer_fits(steer: Any, spec: VaeSpec, name: str = "steer") -> None:
    """Refuse a Steer (or a ``LatentGuidance``, named ``name``) whose VAE takes other chunks
    than the policy predicts, or whose mask lets guidance into the policy's padded action
    dims (none given, or nonzero past D_r)."""
    shape = _vae_shape(steer.encoder.source)
    if shape is not None and shape != (spec.horizon, spec.action_dim):
        raise InvalidArgumentError(
            f"{name}: its VAE takes chunks [B, H, D] = [B, {shape[0]}, {shape[1]}], the "
            f"{spec.policy_type} policy predicts [B, {spec.horizon}, {spec.action_dim}] "
            "(train the VAEs on vae_spec(policy)'s horizon and action width)"
        )
    if spec.raw_action_dim == spec.action_dim:
        return
    mask = steer.encoder.mask
    padded = f"the policy pads its {spec.raw_action_dim} action dims to {spec.action_dim}"
    if mask is None:
        raise InvalidArgumentError(
            f"{name}: has no mask, but {padded}: guidance would move the padded dims, which "
            f"the policy's loss keeps; pass mask=vae_spec(policy).mask() to the {name}"
        )
    shaped = mask.ndim in (1, 2) and mask.shape[-1] == spec.action_dim
    if not shaped or bool(mask.detach()[..., spec.raw_action_dim :].ne(0).any()):
        raise InvalidArgumentError(
            f"{name}: its mask {tuple(mask.shape)} must be [D = {spec.action_dim}] (or "
            f"[B, D]) and 0 past the robot's dims, as {padded}; use vae_spec(policy).mask()"
        )


def encoder_device(steer: Any) -> Optional[torch.device]:
    """The device of the Steer encoder's weights (None for a weightless function)."""
    for module in steer.encoder.modules:
        if isinstance(module, nn.Module):
            for param in module.parameters():
                return param.device
    return None


def check_steer_device(steer: Any, actions: Tensor) -> None:
    """Refuse an encoder on another device than the policy's batch, with what to do."""
    device = encoder_device(steer)
    if device is not None and device != actions.device:
        raise InvalidArgumentError(
            f"steer: its encoder is on {device}, the policy's batch on {actions.device}; "
            f"move the VAE there (vae.to({str(actions.device)!r}), or load_checkpoint(..., "
            "map_location=...)) before training"
        )
