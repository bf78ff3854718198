"""The InfoVAE losses of ATE's Align stage (ATE_METHOD.md, Stage 1 and Stage 2).

    L1 = SmoothL1(D(z), a) + β · KL(q(z|a) ‖ N(0, I)) + γ · MMD(q(z), N(0, I))
    L2 = SmoothL1(D(z), ã) + β · KL(q(z|ã) ‖ p_pre)   + γ · MMD(q(z), p_pre)      (paper)
    L2 = SmoothL1(D(z), ã) + β · KL(p_pre ‖ q(z|ã))   + γ · MMD(q(z), N(0, I))    (released code)

Reductions follow the released code: reconstruction is the mean over (unmasked) elements
(the action-dim mask, and optionally a per-step mask that leaves a chunk's padding out),
KL the mean over batch and latent elements (a mixture's KL, which does not split by
element, is divided by ``d_z``), MMD the unbiased estimate between the batch's ``z`` and
as many prior samples. Every term is computed in float32 (or wider).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ate_fast.align.action_mask import check_mask
from ate_fast.align.prior import LatentPrior
from ate_fast.align.vae import VAEOutput

# The released code's weights (ATE_METHOD.md): β on the per-element KL, γ on the MMD.
DEFAULT_BETA = 7.5e-5
DEFAULT_GAMMA = 1.0
KL_DIRECTIONS = ("reverse", "forward")


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --- reconstruction --------------------------------------------------------------------
def reconstruction_loss(
    recon: Tensor,
    target: Tensor,
    mask: Optional[Tensor] = None,
    beta: float = 1.0,
    steps: Optional[Tensor] = None,
) -> Tensor:
    """SmoothL1 (Huber, threshold ``beta``) averaged over the elements the masks keep.

    ``recon``/``target`` ``[B, H, D]``; ``mask`` ``[D]`` or ``[B, D]`` (1 = a real dim);
    ``steps`` ``[B, H]`` (1 = a real step, 0 = padding past the episode's end: those steps
    count for nothing, as LeRobot's ``do_mask_loss_for_padding`` and ACT's ``is_pad`` do).
    """
    if recon.shape != target.shape:
        raise ValueError(
            f"recon/target: shapes differ, {tuple(recon.shape)} vs {tuple(target.shape)}"
        )
    loss = F.smooth_l1_loss(_f32(recon), _f32(target), reduction="none", beta=beta)
    m = check_mask(mask, target.shape[0], target.shape[-1])
    if m is None and steps is None:
        return loss.mean()
    weight = torch.ones((), dtype=loss.dtype, device=loss.device)
    if m is not None:
        weight = weight * m.to(loss.dtype).unsqueeze(1)
    if steps is not None:
        if tuple(steps.shape) != tuple(target.shape[:2]):
            raise ValueError(
                f"steps: expected shape [B, H]={list(target.shape[:2])}, got {list(steps.shape)}"
            )
        weight = weight * steps.to(loss.dtype).unsqueeze(-1)
    weight = weight.expand_as(loss)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


# --- KL --------------------------------------------------------------------------------
def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Element-wise ``KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²))`` (broadcasting)."""
    return 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) / torch.exp(logvar_p) - 1.0
    )


def standard_normal_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Element-wise ``KL(N(μ, σ²) ‖ N(0, 1))``."""
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar)


def log_normal_diag(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z | μ, diag exp(logvar))``, summed over the last dim (broadcasting)."""
    return -0.5 * (
        math.log(2 * math.pi) * z.shape[-1] + (logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)
    )


def monte_carlo_kl(
    mu: Tensor,
    logvar: Tensor,
    prior: LatentPrior,
    direction: str = "reverse",
    n_samples: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-sample KL (summed over latent dims) between ``q = N(μ, diag σ²)`` and ``prior``.

    ``reverse``: ``E_q[log q(z) − log p(z)]`` with reparameterised ``z`` (gradients reach
    μ, σ). ``forward``: ``E_p[log p(z) − log q(z)]`` with ``z`` drawn from the prior.
    ``mu``/``logvar`` ``[B, d_z]`` → ``[B]``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples: expected >= 1, got {n_samples}")
    mu, logvar = _f32(mu), _f32(logvar)
    if direction == "reverse":
        eps = torch.randn(
            (n_samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype
        )
        z = mu + torch.exp(0.5 * logvar) * eps  # [S, B, d]
        log_q = log_normal_diag(z, mu, logvar)
        log_p = prior.log_prob(z.reshape(-1, mu.shape[1])).view(n_samples, -1)
        return (log_q - log_p).mean(0)
    if direction == "forward":
        z = prior.sample(n_samples, generator).to(mu)  # [S, d]
        log_p = prior.log_prob(z)[:, None]  # [S, 1]
        log_q = log_normal_diag(z[:, None, :], mu[None], logvar[None])  # [S, B]
        return (log_p - log_q).mean(0)
    raise ValueError(f"direction: expected one of {list(KL_DIRECTIONS)}, got {direction!r}")


def kl_loss(
    mu: Tensor,
    logvar: Tensor,
    prior: Optional[LatentPrior] = None,
    direction: str = "reverse",
    n_samples: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """KL between the posteriors and the prior, averaged over batch and latent elements.

    ``prior=None`` is ``N(0, I)``. A Gaussian prior (one component) uses the closed form in
    either direction; a mixture uses :func:`monte_carlo_kl` with ``n_samples`` draws.
    ``direction="reverse"`` is ``KL(q ‖ p)`` (the paper), ``"forward"`` ``KL(p ‖ q)``.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction: expected one of {list(KL_DIRECTIONS)}, got {direction!r}")
    mu, logvar = _f32(mu), _f32(logvar)
    if prior is None:
        zeros = torch.zeros_like(mu)
        if direction == "reverse":
            return standard_normal_kl(mu, logvar).mean()
        return gaussian_kl(zeros, zeros, mu, logvar).mean()
    if prior.latent_dim != mu.shape[1]:
        raise ValueError(
            f"prior: latent dim {prior.latent_dim} does not match the posterior's {mu.shape[1]}"
        )
    if prior.is_gaussian:
        mu_p = prior.means[0].to(mu)
        logvar_p = torch.log(prior.variances[0]).to(mu)
        if direction == "reverse":
            return gaussian_kl(mu, logvar, mu_p, logvar_p).mean()
        return gaussian_kl(mu_p, logvar_p, mu, logvar).mean()
    kl = monte_carlo_kl(mu, logvar, prior, direction, n_samples, generator)
    return kl.mean() / mu.shape[1]


# --- MMD -------------------------------------------------------------------------------
def imq_kernel(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Inverse multiquadratic kernel ``k(x, y) = C / (C + ‖x − y‖²)``; ``[N, d], [M, d] → [N, M]``.

    The squared distance is expanded (no ``[N, M, d]`` tensor) and clamped at 0 against
    round-off.
    """
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return c / (c + d2.clamp_min(0.0))


def mmd_imq(x: Tensor, y: Tensor, prior_variance: float = 1.0) -> Tensor:
    """Unbiased MMD² between samples ``x [N, d]`` and ``y [M, d]`` with the IMQ kernel,
    ``C = 2 · d · s²`` (``s² = prior_variance``). Zero in expectation when x, y share a law.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x/y: expected [N, d] and [M, d], got {tuple(x.shape)}, {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"x/y: the unbiased MMD needs at least 2 samples each, got {n} and {m}")
    x, y = _f32(x), _f32(y).to(x.dtype)
    c = 2.0 * x.shape[1] * float(prior_variance)
    kxx, kyy, kxy = imq_kernel(x, x, c), imq_kernel(y, y, c), imq_kernel(x, y, c)
    sum_xx = kxx.sum() - kxx.diagonal().sum()
    sum_yy = kyy.sum() - kyy.diagonal().sum()
    return sum_xx / (n * (n - 1)) + sum_yy / (m * (m - 1)) - 2.0 * kxy.mean()


# --- the stage losses ------------------------------------------------------------------
class LossTerms(NamedTuple):
    """``total = recon + β·kl + γ·mmd`` and its parts (scalars)."""

    total: Tensor
    recon: Tensor
    kl: Tensor
    mmd: Tensor


def stage1_loss(
    out: VAEOutput,
    target: Tensor,
    mask: Optional[Tensor] = None,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    generator: Optional[torch.Generator] = None,
    *,
    steps: Optional[Tensor] = None,
) -> LossTerms:
    """``SmoothL1 + β·KL(q ‖ N(0, I)) + γ·MMD(q(z), N(0, I))``; ``steps`` ``[B, H]``: the
    real steps (padding left out of the reconstruction, :func:`reconstruction_loss`)."""
    recon = reconstruction_loss(out.recon, target, mask, steps=steps)
    kl = kl_loss(out.mu, out.logvar)
    z = _f32(out.z)
    prior_z = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    mmd = mmd_imq(z, prior_z, 1.0)
    return LossTerms(recon + beta * kl + gamma * mmd, recon, kl, mmd)


def stage2_loss(
    out: VAEOutput,
    target: Tensor,
    prior: LatentPrior,
    mask: Optional[Tensor] = None,
    beta: float = DEFAULT_BETA,
    gamma: float = DEFAULT_GAMMA,
    kl: str = "reverse",
    kl_samples: int = 8,
    generator: Optional[torch.Generator] = None,
    prior_variance: Optional[float] = None,
    *,
    steps: Optional[Tensor] = None,
) -> LossTerms:
    """Stage-2 loss with the stage-1 ``prior``.

    ``kl="reverse"`` (paper): ``β·KL(q ‖ p_pre) + γ·MMD(q(z), p_pre)``, the MMD kernel
    scale ``s²`` from the prior's mean marginal variance (pass ``prior_variance`` to
    skip recomputing it every step). ``kl="forward"`` (released code):
    ``β·KL(p_pre ‖ q) + γ·MMD(q(z), N(0, I))``. ``steps`` ``[B, H]``: the real steps
    (padding left out of the reconstruction, :func:`reconstruction_loss`).
    """
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl: expected one of {list(KL_DIRECTIONS)}, got {kl!r}")
    recon = reconstruction_loss(out.recon, target, mask, steps=steps)
    kl_term = kl_loss(out.mu, out.logvar, prior, kl, kl_samples, generator)
    z = _f32(out.z)
    if kl == "reverse":
        prior_z = prior.sample(z.shape[0], generator).to(z)
        s2 = prior.marginal_variance().mean().item() if prior_variance is None else prior_variance
    else:
        prior_z = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        s2 = 1.0
    mmd = mmd_imq(z, prior_z, s2)
    return LossTerms(recon + beta * kl_term + gamma * mmd, recon, kl_term, mmd)
