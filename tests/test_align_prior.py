"""LatentPrior: the three summaries of the stage-1 latents, sampling, files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ate_fast.align import ActionVAE, CheckpointError, LatentPrior
from ate_fast.align.atomic_io import atomic_save_safetensors


def _latents(n=3000, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g) * torch.tensor([2.0, 0.5, 1.0, 3.0]) + 1.0
    logvar = torch.randn(n, d, generator=g) * 0.3 - 1.0
    return mu, logvar


def test_gaussian_uses_the_law_of_total_variance():
    mu, logvar = _latents()
    prior = LatentPrior.from_latents(mu, logvar, kind="gaussian")
    m, v = mu.double().numpy(), logvar.double().exp().numpy()
    np.testing.assert_allclose(prior.mean.numpy(), m.mean(0), rtol=1e-5)
    expected_var = (v + m**2).mean(0) - m.mean(0) ** 2
    np.testing.assert_allclose(prior.variances[0].numpy(), expected_var, rtol=1e-5)
    # independently: pool samples of every posterior, their variance is the aggregate's
    g = torch.Generator().manual_seed(1)
    pooled = mu + (0.5 * logvar).exp() * torch.randn(200, *mu.shape, generator=g)
    np.testing.assert_allclose(
        prior.variances[0].numpy(), pooled.reshape(-1, 4).var(0).numpy(), rtol=0.01
    )


def test_gaussian_code_averages_sigmas_and_drops_the_spread_of_means():
    mu, logvar = _latents()
    prior = LatentPrior.from_latents(mu, logvar, kind="gaussian-code")
    sigma_bar = (0.5 * logvar.double()).exp().mean(0)
    np.testing.assert_allclose(prior.variances[0].sqrt().numpy(), sigma_bar.numpy(), rtol=1e-5)
    paper = LatentPrior.from_latents(mu, logvar, kind="gaussian")
    assert (prior.variances < paper.variances).all()


def test_gmm_recovers_separated_modes():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-4.0, 0.0, 2.0], [3.0, 3.0, 0.0], [0.0, -4.0, -3.0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    counts = (weights * 3000).long()
    mu = torch.cat([c + 0.3 * torch.randn(int(k), 3, generator=g) for c, k in zip(centers, counts)])
    prior = LatentPrior.from_latents(mu, torch.zeros_like(mu), kind="gmm", n_components=3, seed=0)
    assert prior.info["em_converged"]
    best = min(
        itertools.permutations(range(3)),
        key=lambda p: (prior.means[list(p)] - centers).abs().sum().item(),
    )
    torch.testing.assert_close(prior.means[list(best)], centers, atol=0.05, rtol=0)
    torch.testing.assert_close(prior.weights[list(best)], weights, atol=0.01, rtol=0)
    torch.testing.assert_close(prior.variances, torch.full((3, 3), 0.09), atol=0.02, rtol=0)
    # the modes have high density, the space between them does not
    assert (prior.log_prob(centers) > prior.log_prob(centers.mean(0, keepdim=True)) + 20).all()


def test_sampling_moments_and_generator():
    prior = LatentPrior(
        torch.tensor([0.3, 0.7]),
        torch.tensor([[-2.0, 1.0], [1.0, 0.0]]),
        torch.tensor([[0.5, 0.2], [0.1, 1.0]]),
    )
    s = prior.sample(200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean(0), prior.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(s.var(0), prior.marginal_variance(), atol=0.02, rtol=0)
    a = prior.sample(5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, prior.sample(5, torch.Generator().manual_seed(3)))


def test_fit_encodes_every_chunk(tmp_path):
    vae = ActionVAE(2, 3, 4, arch="mlp", hidden_dims=(8,))
    data = torch.randn(37, 3, 2)
    prior = LatentPrior.fit(vae, data, kind="gaussian", batch_size=10, progress=False)
    with torch.no_grad():
        mu, logvar = vae.encode(data)
    ref = LatentPrior.from_latents(mu, logvar, kind="gaussian")
    torch.testing.assert_close(prior.means, ref.means)
    torch.testing.assert_close(prior.variances, ref.variances)
    assert prior.info["n_latents"] == 37


def test_save_load_round_trip_and_bad_files(tmp_path):
    mu, logvar = _latents(n=500)
    prior = LatentPrior.from_latents(mu, logvar, kind="gmm", n_components=2)
    prior.save(tmp_path / "prior.pt")
    back = LatentPrior.load(tmp_path / "prior.pt")
    assert back.kind == "gmm" and back.info == prior.info
    for name in ("weights", "means", "variances"):
        torch.testing.assert_close(getattr(back, name), getattr(prior, name), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file
    atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a LatentPrior file"):
        LatentPrior.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 40)
    # told by content (issue 15): a named error saying what the file is
    with pytest.raises(CheckpointError, match=r"expected a LatentPrior file .* unknown format"):
        LatentPrior.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="no such file"):
        LatentPrior.load(tmp_path / "missing.pt")


def test_errors():
    mu, logvar = _latents(n=5)
    with pytest.raises(ValueError, match="kind: expected one of"):
        LatentPrior.from_latents(mu, logvar, kind="flow")
    with pytest.raises(ValueError, match=r"n_components: expected 1 <= K <= N=5"):
        LatentPrior.from_latents(mu, logvar, kind="gmm", n_components=8)
    with pytest.raises(ValueError, match=r"z: expected \[N, d_z\]=\[N, 4\]"):
        LatentPrior.standard_normal(4).log_prob(torch.zeros(3, 2))


@pytest.mark.parametrize("kind", ["gaussian", "gaussian-code", "gmm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_are_refused(kind, bad):
    """One latent of a diverged stage-1 encoder made the gaussian kinds' means NaN."""
    mu, logvar = _latents(n=12)
    mu[3, 1] = bad
    with pytest.raises(
        ValueError, match="mu/logvar: expected finite latents, got NaN or inf in 1 of 12"
    ):
        LatentPrior.from_latents(mu, logvar, kind=kind)
    mu, logvar = _latents(n=12)
    logvar[0, 0] = float("nan")
    with pytest.raises(ValueError, match="expected finite latents"):
        LatentPrior.from_latents(mu, logvar, kind=kind)


def test_parameters_must_be_finite_with_positive_weight():
    ones, zeros = torch.ones(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="positive sum"):  # was divided by 0: NaN weights
        LatentPrior(torch.zeros(2), zeros, ones)
    for weights, means, variances in [
        (torch.ones(2), zeros, torch.full((2, 4), float("nan"))),
        (torch.tensor([1.0, float("nan")]), zeros, ones),
        (torch.ones(2), torch.full((2, 4), float("inf")), ones),
    ]:
        with pytest.raises(ValueError, match="expected finite values"):
            LatentPrior(weights, means, variances)
