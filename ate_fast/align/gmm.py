"""A diagonal-covariance Gaussian mixture fitted by EM (for the ``gmm`` latent prior).

k-means++ seeding and a few Lloyd iterations give the starting means; EM then runs in
float64 until the mean log-likelihood improves by less than ``tol``. Variances are floored
at ``reg_covar`` (the same safeguard scikit-learn uses) so no component collapses onto a
single point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GMMFit:
    """``weights [K]``, ``means [K, d]``, ``variances [K, d]`` (float64) and how EM ended."""

    weights: Tensor
    means: Tensor
    variances: Tensor
    log_likelihood: float  # mean per point
    n_iter: int
    converged: bool


def diagonal_log_prob(x: Tensor, weights: Tensor, means: Tensor, variances: Tensor) -> Tensor:
    """Per-component joint log-density ``log w_k + log N(x | μ_k, diag v_k)``, ``[N, K]``."""
    d = x.shape[1]
    inv = 1.0 / variances  # [K, d]
    # ‖x−μ‖²_inv expanded so that no [N, K, d] tensor is formed.
    quad = (x * x) @ inv.T - 2.0 * x @ (means * inv).T + (means * means * inv).sum(1)
    log_det = torch.log(variances).sum(1)
    return torch.log(weights) - 0.5 * (d * math.log(2 * math.pi) + log_det + quad)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    n = x.shape[0]
    centers = [x[torch.randint(n, (1,), generator=gen).item()]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=gen).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(centers)


def fit_diagonal_gmm(
    x: Tensor,
    n_components: int,
    max_iter: int = 200,
    tol: float = 1e-5,
    reg_covar: float = 1e-6,
    kmeans_iter: int = 10,
    seed: int = 0,
) -> GMMFit:
    """Fit ``K = n_components`` diagonal Gaussians to ``x [N, d]`` by EM.

    Raises:
        ValueError: ``x`` not ``[N, d]``, non-finite values, or fewer points than components.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected [N, d], got {tuple(x.shape)}")
    n = x.shape[0]
    if n_components < 1 or n < n_components:
        raise ValueError(
            f"n_components: expected 1 <= K <= N={n} (points to fit), got {n_components}"
        )
    x = x.detach().to(torch.float64).cpu()
    if not torch.isfinite(x).all():
        raise ValueError("x: contains NaN or inf")
    gen = torch.Generator().manual_seed(seed)

    means = _kmeans_pp(x, n_components, gen)
    for _ in range(kmeans_iter):
        assign = torch.cdist(x, means).argmin(1)
        for j in range(n_components):
            members = x[assign == j]
            if len(members):
                means[j] = members.mean(0)
    resp = torch.nn.functional.one_hot(torch.cdist(x, means).argmin(1), n_components).to(x)

    prev = -math.inf
    ll, converged, n_iter = -math.inf, False, 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is reported after the loop)
        # M step: weighted moments of the responsibilities.
        nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
        weights = nk / n
        means = (resp.T @ x) / nk[:, None]
        variances = (resp.T @ (x * x)) / nk[:, None] - means * means
        variances = variances.clamp_min(0.0) + reg_covar
        # E step.
        joint = diagonal_log_prob(x, weights, means, variances)
        log_norm = torch.logsumexp(joint, dim=1)
        resp = torch.exp(joint - log_norm[:, None])
        ll = log_norm.mean().item()
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    return GMMFit(weights, means, variances, ll, n_iter, converged)
