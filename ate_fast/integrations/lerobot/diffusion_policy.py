"""LeRobot ``DiffusionPolicy``: its sampling loop and its training loss, through ate_fast.

``conditional_sample`` (LeRobot: a diffusers DDPM/DDIM ``scheduler.step`` loop around the
U-Net) becomes a :class:`~ate_fast.sampling.DiffusionSampler` with the same schedule,
method, step count, prediction type and clipping, drawing the initial noise and the step
noise from the same RNG in the same order — so the patched policy returns the same
actions for the same seed. ``compute_loss`` becomes the same loss with
:class:`~ate_fast.steer.Steer`'s correction (LeRobot's padding mask still applied).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ate_fast.errors import UnsupportedPolicyError
from ate_fast.integrations.lerobot.loop import SamplingLoop
from ate_fast.integrations.lerobot.steer_fit import check_steer_device
from ate_fast.sampling import DiffusionSampler, NoiseSchedule

# diffusers scheduler settings the DiffusionSampler reproduces (LeRobot leaves them at
# these defaults; a loaded policy whose scheduler differs is refused, not approximated)
_SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {"variance_type": "fixed_small", "timestep_spacing": "leading",
                      "steps_offset": 0, "thresholding": False, "rescale_betas_zero_snr": False},
    "DDIMScheduler": {"timestep_spacing": "leading", "steps_offset": 0,
                      "set_alpha_to_one": True, "thresholding": False,
                      "rescale_betas_zero_snr": False},
}  # fmt: skip
_METHODS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}


def _param(module: torch.nn.Module) -> Tensor:
    return next(iter(module.parameters()))


def diffusion_sampler(model: Any) -> DiffusionSampler:
    """The DiffusionSampler equal to ``model`` (a LeRobot ``DiffusionModel``)'s loop."""
    scheduler = model.noise_scheduler
    name = type(scheduler).__name__
    if name not in _METHODS:
        raise UnsupportedPolicyError(
            f"DiffusionPolicy's noise scheduler {name} is not supported (DDPM or DDIM)"
        )
    cfg = scheduler.config
    for key, value in _SCHEDULER_DEFAULTS[name].items():
        if cfg.get(key, value) != value:
            raise UnsupportedPolicyError(
                f"DiffusionPolicy's {name} has {key}={cfg.get(key)!r}; ate_fast reproduces "
                f"{key}={value!r} only"
            )
    schedule = NoiseSchedule(
        cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end
    )
    ours = schedule.alphas_cumprod.float()
    if not torch.equal(ours, scheduler.alphas_cumprod.float().cpu()):
        raise UnsupportedPolicyError(
            f"DiffusionPolicy's schedule ({cfg.beta_schedule}) does not match ate_fast's "
            "NoiseSchedule bit for bit"
        )
    unet = model.unet

    def model_fn(x: Tensor, t: Tensor, cond: Optional[Tensor]) -> Tensor:
        return unet(x, t, global_cond=cond)

    return DiffusionSampler(
        model_fn, schedule, method=_METHODS[name], num_steps=int(model.num_inference_steps),
        prediction_type=cfg.prediction_type, clip_sample=bool(cfg.clip_sample),
        clip_sample_range=float(cfg.clip_sample_range),
    )  # fmt: skip


def patched_conditional_sample(model: Any, loop: SamplingLoop):
    """A drop-in ``DiffusionModel.conditional_sample`` running ``loop``."""

    def conditional_sample(
        batch_size: int,
        global_cond: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        if noise is None:  # LeRobot's draw, so the same seed gives the same actions
            param = _param(model)
            shape = (batch_size, model.config.horizon, model.config.action_feature.shape[0])
            noise = torch.randn(
                size=shape, dtype=param.dtype, device=param.device, generator=generator
            )
        return loop(noise, global_cond, generator)

    return conditional_sample


def steered_compute_loss(model: Any, steer: Any, record: Any):
    """A drop-in ``DiffusionModel.compute_loss`` with Steer's correction.

    LeRobot 0.4.4's loss, step for step (the same noise and timestep draws, the same
    padding mask and mean), with ``mse(pred, target)`` replaced by
    ``Steer.diffusion_loss(..., loss_reduction="none")``; ``record(diagnostics)`` receives
    Steer's diagnostics each call.
    """
    from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGES, OBS_STATE

    def compute_loss(batch: dict[str, Tensor]) -> Tensor:
        cfg = model.config
        missing = {OBS_STATE, ACTION, "action_is_pad"} - set(batch)
        if missing or (OBS_IMAGES not in batch and OBS_ENV_STATE not in batch):
            raise KeyError(
                f"batch needs {OBS_STATE}, {ACTION}, action_is_pad and {OBS_IMAGES} or "
                f"{OBS_ENV_STATE}; missing {sorted(missing) or [OBS_IMAGES]}"
            )
        global_cond = model._prepare_global_conditioning(batch)
        trajectory = batch[ACTION]
        check_steer_device(steer, trajectory)
        scheduler = model.noise_scheduler
        eps = torch.randn(trajectory.shape, device=trajectory.device)
        timesteps = torch.randint(
            low=0, high=scheduler.config.num_train_timesteps, size=(trajectory.shape[0],),
            device=trajectory.device,
        ).long()  # fmt: skip
        noisy = scheduler.add_noise(trajectory, eps, timesteps)
        pred = model.unet(noisy, timesteps, global_cond=global_cond)
        loss, diagnostics = steer.diffusion_loss(
            pred, noisy, trajectory, eps, timesteps, scheduler, cfg.prediction_type,
            loss_reduction="none",
        )  # fmt: skip
        record(diagnostics)
        if cfg.do_mask_loss_for_padding:
            loss = loss * (~batch["action_is_pad"]).unsqueeze(-1)
        return loss.mean()

    return compute_loss
