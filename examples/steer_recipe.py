"""ATE Steer: the two lines you add to an openpi / LeRobot style training step.

    python examples/steer_recipe.py          # CPU, a few seconds

1. Build ``Steer`` once, around the frozen adaptation VAE from the Align stage.
2. Replace the MSE of your flow-matching (or diffusion) loss with ``steer.flow_loss``
   (``steer.diffusion_loss``). Everything else in the step stays as it is.

The policies, data and VAE here are tiny stand-ins so that the script runs anywhere; the
training steps are written the way openpi / LeRobot π0 (flow) and LeRobot's Diffusion
Policy (diffusion, with diffusers' DDPMScheduler) write theirs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ate_fast import guided_step
from ate_fast.steer import LatentGuidance, Steer, flow_guidance_coefficient

B, H, D, D_Z, COND = 32, 16, 4, 8, 32


class StandInVAE(nn.Module):
    """Stands in for the stage-2 ActionVAE (``ate-fast align``): ``encode(a) -> (mu, logvar)``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(H * D, 64), nn.GELU(), nn.Linear(64, 2 * D_Z)
        )

    def encode(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(a).chunk(2, dim=-1)
        return mu, logvar


def demonstrations(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of smooth target-robot action chunks [B, H, D] and an observation feature."""
    phase = torch.rand(B, 1, D, generator=generator) * 2 * math.pi
    steps = torch.linspace(0, 1, H)[None, :, None]
    return {
        "action": torch.sin(2 * math.pi * steps + phase),
        "obs": torch.cat([phase.flatten(1).cos(), torch.zeros(B, COND - D)], dim=1),
    }


# ---------------------------------------------------------------------------------------
# flow matching (openpi / LeRobot π0): x_t = t·ε + (1−t)·a0, t = 1 is noise, target ε − a0
# ---------------------------------------------------------------------------------------
class FlowPolicy(nn.Module):
    """A π0-like action expert attending to one conditioning token."""

    def __init__(self) -> None:
        super().__init__()
        from ate_fast.models import make_head

        self.head = make_head(
            "flow-transformer", "small", horizon=H, action_dim=D,
            width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16,
        )  # fmt: skip
        self.obs_proj = nn.Linear(COND, 64)

    def forward(self, x_t, time, obs):
        return self.head(x_t, time, self.obs_proj(obs)[:, None, :])


def flow_training_step(policy, batch, optimizer, steer: Steer, generator):
    actions = batch["action"]
    noise = torch.randn(actions.shape, generator=generator)
    time = torch.distributions.Beta(1.5, 1.0).sample((B,)) * 0.999 + 0.001
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
    u_t = noise - actions
    v_t = policy(x_t, time, batch["obs"])
    # loss = F.mse_loss(v_t, u_t)  # before
    loss, diag = steer.flow_loss(v_t, x_t, actions, noise, time)  # after: ATE Steer
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), F.mse_loss(v_t.detach(), u_t).item(), diag


# ---------------------------------------------------------------------------------------
# diffusion (LeRobot Diffusion Policy): ε-prediction with a DDPM scheduler
# ---------------------------------------------------------------------------------------
def diffusion_training_step(unet, scheduler, batch, optimizer, steer: Steer, generator):
    trajectory = batch["action"]
    noise = torch.randn(trajectory.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=generator)
    noisy_trajectory = scheduler.add_noise(trajectory, noise, timesteps)
    pred = unet(noisy_trajectory, timesteps, batch["obs"])
    # loss = F.mse_loss(pred, noise)  # before
    loss, diag = steer.diffusion_loss(  # after: ATE Steer
        pred, noisy_trajectory, trajectory, noise, timesteps, scheduler, "epsilon"
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), F.mse_loss(pred.detach(), noise).item(), diag


# ---------------------------------------------------------------------------------------
# inference-time steering (beyond the paper): what a sampler does with guidance= per step
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def steered_flow_sample(policy, obs, guidance: LatentGuidance, num_steps=10, generator=None):
    """openpi's Euler loop, t = 1 → 0, with ``v ← v + λ·clamp(c·g, −κ, κ)`` each step —
    ``FlowSampler(policy, num_steps).sample(noise, obs, guidance=guidance)`` does this."""
    x = torch.randn(obs.shape[0], H, D, generator=generator)
    dt = -1.0 / num_steps
    for k in range(num_steps):
        t = torch.full((obs.shape[0],), 1.0 + k * dt)
        v = policy(x, t, obs)
        g = guidance.gradient(x, x - t[:, None, None] * v, torch.ones_like(t))
        c = flow_guidance_coefficient(t, "openpi")
        x = guided_step(x, v, a=1.0, b=dt, g=g, c=c, scale=guidance.scale, clamp=guidance.clamp)
    return x


def main(steps: int = 20, seed: int = 0, verbose: bool = True) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = StandInVAE()  # in practice: the stage-2 ActionVAE trained by `ate-fast align`
    history: dict[str, list[float]] = {"flow": [], "diffusion": []}

    # --- flow ---
    policy = FlowPolicy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    steer = Steer(vae, scale=2.0, clamp=0.1)  # the paper's λ, κ; Steer.released_code(vae) for 3
    for step in range(steps):
        loss, mse, diag = flow_training_step(policy, demonstrations(gen), optimizer, steer, gen)
        history["flow"].append(loss)
        if verbose and step % 10 == 0:
            print(
                f"flow      step {step:3d}  steer loss {loss:.4f}  plain mse {mse:.4f}  "
                f"clamped {diag['clamp_fraction']:.0%}  "
                f"|λg̃|/|target| {diag['correction_ratio']:.3f}"
            )

    # --- diffusion ---
    from diffusers import DDPMScheduler  # or ate_fast's NoiseSchedule: anything with alphas_cumprod

    from ate_fast.models import ConditionalUnet1D

    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    unet = ConditionalUnet1D("small", horizon=H, action_dim=D, cond_dim=COND)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-4)
    for step in range(steps):
        loss, mse, diag = diffusion_training_step(
            unet, scheduler, demonstrations(gen), optimizer, steer, gen
        )
        history["diffusion"].append(loss)
        if verbose and step % 10 == 0:
            print(
                f"diffusion step {step:3d}  steer loss {loss:.4f}  plain mse {mse:.4f}  "
                f"clamped {diag['clamp_fraction']:.0%}"
            )

    # --- inference-time steering toward a target latent (e.g. LatentPrior of stage 2) ---
    target = vae.encode(demonstrations(gen)["action"])[0].mean(0).detach()
    guidance = LatentGuidance(vae, target, scale=2.0, clamp=0.1, mode="direct")
    obs = demonstrations(gen)["obs"][:4]
    actions = steered_flow_sample(policy.eval(), obs, guidance, generator=gen)
    if verbose:
        print(f"steered sample: {tuple(actions.shape)}, finite={bool(actions.isfinite().all())}")
    history["sample_finite"] = [float(actions.isfinite().all())]
    return history


if __name__ == "__main__":
    main()
