"""Steer losses against a direct transcription of ATE_METHOD.md, Stage 3.

The transcription below is written from the document, not from ate_fast: each sample's
``y_i = −(1/N)‖E(x_i) − E(a0_i)‖²`` is differentiated on its own (÷B for the released
code's batch mean), the coefficient table and targets are typed in, and the loss is
``mean((pred + λ·clamp(c·g, −κ, κ) − target)²)``. Everything runs in float64.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ate_fast.steer import Steer

B, H, D, DZ = 5, 6, 3, 4
F64 = torch.float64


class TinyVAE(nn.Module):
    """A nonlinear encoder with .encode -> (mu, logvar), like ate_fast.align's ActionVAE."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(H * D, 16), nn.Tanh(), nn.Linear(16, 2 * DZ)
        )

    def encode(self, a):
        mu, logvar = self.encoder(a).chunk(2, dim=-1)
        return mu, logvar


def make_vae() -> TinyVAE:
    vae = TinyVAE().to(F64)
    with torch.no_grad():  # large enough weights that c·g straddles κ
        for p in vae.parameters():
            p.mul_(3.0)
    return vae


# ----------------------------------------------------------------------------------
# transcription of the method
# ----------------------------------------------------------------------------------
def transcribed_g(vae, x, a0, latent, reduction, eps):
    rows = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        mu, logvar = vae.encode(xi)
        with torch.no_grad():
            mu0, logvar0 = vae.encode(a0[i : i + 1])
        if latent == "sample":
            z = mu + torch.exp(0.5 * logvar) * eps[i : i + 1]
            z0 = mu0 + torch.exp(0.5 * logvar0) * eps[i : i + 1]
        else:
            z, z0 = mu, mu0
        y = -((z - z0) ** 2).sum() / DZ
        if reduction == "batch":
            y = y / x.shape[0]
        (gi,) = torch.autograd.grad(y, xi)
        rows.append(gi)
    return torch.cat(rows)


def transcribed_loss(pred, target, g, c, lam, kappa):
    corrected = pred + lam * torch.clamp(c.view(-1, 1, 1) * g, -kappa, kappa)
    return ((corrected - target) ** 2).mean()


def diffusion_c_and_target(prediction_type, ab, a0, noise):
    abv = ab.view(-1, 1, 1)
    if prediction_type == "epsilon":
        return -torch.sqrt(1 - ab), noise
    if prediction_type == "sample":
        return (1 - ab) / torch.sqrt(ab), a0
    return -torch.sqrt((1 - ab) / ab), torch.sqrt(abv) * noise - torch.sqrt(1 - abv) * a0


def shared_eps(seed):
    return torch.randn((B, DZ), generator=torch.Generator().manual_seed(seed), dtype=F64)


def kappa_between(c, g):
    """A κ that clamps some elements and not others, so both branches are checked; it sits
    halfway between two distinct values of |c·g| so rounding cannot move an element across."""
    values = torch.unique((c.view(-1, 1, 1) * g).abs())
    mid = values.numel() // 2
    return float(values[mid - 1] + values[mid]) / 2


def cosine_schedule(num_train=100):
    steps = torch.arange(num_train + 1, dtype=F64) / num_train
    f = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return SimpleNamespace(alphas_cumprod=(f[1:] / f[0]).clamp(1e-4, 1.0))


# ----------------------------------------------------------------------------------
# diffusion
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("reduction", ["sample", "batch"])
@pytest.mark.parametrize("latent", ["mean", "sample"])
def test_diffusion_loss_matches_transcription(prediction_type, reduction, latent):
    vae = make_vae()
    schedule = cosine_schedule()
    a0 = torch.randn(B, H, D, dtype=F64)
    noise = torch.randn(B, H, D, dtype=F64)
    timesteps = torch.tensor([0, 17, 50, 83, 99])
    ab = schedule.alphas_cumprod[timesteps]
    x_k = ab.sqrt().view(-1, 1, 1) * a0 + (1 - ab).sqrt().view(-1, 1, 1) * noise
    pred = torch.randn(B, H, D, dtype=F64)

    c, target = diffusion_c_and_target(prediction_type, ab, a0, noise)
    g = transcribed_g(vae, x_k, a0, latent, reduction, shared_eps(3))
    lam, kappa = 2.0, kappa_between(c, g)
    ref_pred = pred.clone().requires_grad_(True)
    ref = transcribed_loss(ref_pred, target, g, c, lam, kappa)
    ref.backward()

    steer = Steer(vae, scale=lam, clamp=kappa, latent=latent, reduction=reduction)
    got_pred = pred.clone().requires_grad_(True)
    loss, diag = steer.diffusion_loss(
        got_pred, x_k, a0, noise, timesteps, schedule, prediction_type,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    loss.backward()

    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_pred.grad, ref_pred.grad, rtol=1e-12, atol=1e-14)
    u = c.view(-1, 1, 1) * g
    assert 0.0 < float(diag["clamp_fraction"]) < 1.0
    torch.testing.assert_close(diag["clamp_fraction"], (u.abs() > kappa).to(F64).mean())
    torch.testing.assert_close(diag["grad_norm"], g.flatten(1).norm(dim=1).mean())
    torch.testing.assert_close(
        diag["correction_ratio"], (lam * u.clamp(-kappa, kappa)).norm() / target.norm()
    )
    assert all(p.grad is None for p in vae.parameters())


def test_diffusion_loss_accepts_a_diffusers_scheduler_and_a_tensor():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    vae = make_vae()
    a0, noise = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    timesteps = torch.tensor([3, 250, 500, 750, 999])
    ab = sched.alphas_cumprod[timesteps].to(F64)
    x_k = ab.sqrt().view(-1, 1, 1) * a0 + (1 - ab).sqrt().view(-1, 1, 1) * noise
    pred = torch.randn(B, H, D, dtype=F64, requires_grad=True)
    c, target = diffusion_c_and_target("v_prediction", ab, a0, noise)
    g = transcribed_g(vae, x_k, a0, "mean", "sample", None)
    ref = transcribed_loss(pred, target, g, c, 2.0, 0.1)
    steer = Steer(vae)
    for schedule in (sched, sched.alphas_cumprod):
        loss, _ = steer.diffusion_loss(pred, x_k, a0, noise, timesteps, schedule, "v_prediction")
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# flow
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["openpi", "paper"])
@pytest.mark.parametrize("reduction", ["sample", "batch"])
@pytest.mark.parametrize("latent", ["mean", "sample"])
def test_flow_loss_matches_transcription(convention, reduction, latent):
    vae = make_vae()
    a0 = torch.randn(B, H, D, dtype=F64)
    noise = torch.randn(B, H, D, dtype=F64)
    t = torch.tensor([0.0, 0.1, 0.45, 0.9, 1.0], dtype=F64)
    tv = t.view(-1, 1, 1)
    if convention == "openpi":  # x_t = t·ε + (1−t)·a0, t = 1 is noise, target ε − a0
        x_t, target = tv * noise + (1 - tv) * a0, noise - a0
        c = -t / torch.clamp(1 - t, min=1e-6)
    else:  # a^τ = τ·a0 + (1−τ)·ε, τ = 1 is data, target a0 − ε
        x_t, target = tv * a0 + (1 - tv) * noise, a0 - noise
        c = (1 - t) / torch.clamp(t, min=1e-6)
    pred = torch.randn(B, H, D, dtype=F64)
    g = transcribed_g(vae, x_t, a0, latent, reduction, shared_eps(9))
    lam, kappa = 2.0, kappa_between(c, g)
    ref_pred = pred.clone().requires_grad_(True)
    ref = transcribed_loss(ref_pred, target, g, c, lam, kappa)
    ref.backward()

    steer = Steer(vae, scale=lam, clamp=kappa, latent=latent, reduction=reduction)
    got_pred = pred.clone().requires_grad_(True)
    loss, diag = steer.flow_loss(
        got_pred, x_t, a0, noise, t, convention, generator=torch.Generator().manual_seed(9)
    )
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_pred.grad, ref_pred.grad, rtol=1e-12, atol=1e-14)
    assert 0.0 < float(diag["clamp_fraction"]) < 1.0
    assert all(p.grad is None for p in vae.parameters())


def test_flow_conventions_are_the_same_rule_under_tau_equals_one_minus_t():
    """ATE_METHOD: the two flow rows agree under τ = 1 − t, v_paper = −v."""
    vae = make_vae()
    steer = Steer(vae, clamp=math.inf)
    a0, noise = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=F64)
    x = t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a0
    v = torch.randn(B, H, D, dtype=F64)
    l_openpi, _ = steer.flow_loss(v, x, a0, noise, t, "openpi")
    l_paper, _ = steer.flow_loss(-v, x, a0, noise, 1 - t, "paper")
    torch.testing.assert_close(l_openpi, l_paper, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------
# gradients: to the policy exactly as the equation, never to the encoder
# ----------------------------------------------------------------------------------
def test_gradient_reaches_policy_as_the_equation_and_not_the_encoder():
    vae = make_vae()
    for p in vae.parameters():
        p.requires_grad_(True)
    steer = Steer(vae, scale=2.0, clamp=0.1, freeze=False)
    assert all(p.requires_grad for p in vae.parameters())  # freeze=False leaves it alone
    policy = nn.Linear(D, D).to(F64)
    a0, noise = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    t = torch.rand(B, dtype=F64)
    x_t = t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a0
    v = policy(x_t)
    v.retain_grad()
    loss, _ = steer.flow_loss(v, x_t, a0, noise, t)
    loss.backward()
    g = transcribed_g(vae, x_t, a0, "mean", "sample", None)
    c = -t / (1 - t)
    corrected = v.detach() + 2.0 * torch.clamp(c.view(-1, 1, 1) * g, -0.1, 0.1)
    # d mean((pred + λg̃ − target)²) / d pred = 2 (pred + λg̃ − target) / numel
    expected = 2 * (corrected - (noise - a0)) / v.numel()
    torch.testing.assert_close(v.grad, expected, rtol=1e-12, atol=1e-15)
    assert policy.weight.grad is not None and policy.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_freeze_puts_the_encoder_in_eval_and_stops_its_gradients():
    vae = make_vae().train()
    Steer(vae)
    assert not vae.training and not vae.encoder.training
    assert not any(p.requires_grad for p in vae.parameters())


def test_loss_reduction_none_returns_elementwise_error():
    vae = make_vae()
    steer = Steer(vae)
    a0, noise = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    t = torch.rand(B, dtype=F64)
    x_t = t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a0
    v = torch.randn(B, H, D, dtype=F64)
    full, _ = steer.flow_loss(v, x_t, a0, noise, t, loss_reduction="none")
    mean, _ = steer.flow_loss(v, x_t, a0, noise, t)
    assert full.shape == (B, H, D)
    torch.testing.assert_close(full.mean(), mean)


def test_batch_reduction_divides_g_by_batch_size():
    vae = make_vae()
    x, a0 = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    g_sample = Steer(vae, reduction="sample").guidance(x, a0)
    g_batch = Steer(vae, reduction="batch").guidance(x, a0)
    torch.testing.assert_close(g_batch * B, g_sample, rtol=1e-12, atol=1e-15)
    assert g_sample.abs().max() > 0


def test_float32_policy_output_with_float32_encoder():
    vae = make_vae().float()
    steer = Steer(vae)
    a0, noise = torch.randn(B, H, D), torch.randn(B, H, D)
    t = torch.rand(B)
    x_t = t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a0
    v = torch.randn(B, H, D, requires_grad=True)
    loss, _ = steer.flow_loss(v, x_t, a0, noise, t)
    assert loss.dtype == torch.float32
    g = transcribed_g(vae, x_t, a0, "mean", "sample", None)
    ref = transcribed_loss(v, noise - a0, g, -t / (1 - t), 2.0, 0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_recommended_preset_is_the_flipped_sign():
    torch.manual_seed(0)
    vae = make_vae()
    steer = Steer.recommended(vae)
    assert (steer.scale, steer.clamp, steer.latent, steer.reduction) == (
        -2.0,
        0.1,
        "mean",
        "sample",
    )
    assert Steer.recommended(vae, clamp=0.3).clamp == 0.3
    x, a0, noise, pred = (torch.randn(B, H, D, dtype=torch.float64) for _ in range(4))
    t = torch.rand(B, dtype=torch.float64) * 0.9
    loss = steer.flow_loss(pred, x, a0, noise, t, loss_reduction="none").loss
    c = (-t / (1 - t)).view(-1, 1, 1)
    g_tilde = (c * steer.guidance(x, a0)).clamp(-0.1, 0.1)
    # the paper's correction with the opposite sign: pred − 2·g̃ regressed on ε − a0
    torch.testing.assert_close(loss, (pred - 2.0 * g_tilde - (noise - a0)).square())


def test_released_code_preset():
    steer = Steer.released_code(make_vae())
    assert (steer.scale, steer.clamp, steer.latent, steer.reduction) == (
        3.0, 0.1, "sample", "batch"
    )  # fmt: skip
    assert Steer.released_code(make_vae(), scale=2.0).scale == 2.0
