"""Every loss against an independent computation (torch.distributions / direct formulas)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)

from ate_fast.align import (
    DEFAULT_BETA,
    DEFAULT_GAMMA,
    LatentPrior,
    VAEOutput,
    gaussian_kl,
    imq_kernel,
    kl_loss,
    mmd_imq,
    monte_carlo_kl,
    reconstruction_loss,
    stage1_loss,
    stage2_loss,
    standard_normal_kl,
)


def _posterior(b=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(b, d, generator=g, dtype=torch.float64)
    logvar = 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return mu, logvar


def _gmm(d=3):
    weights = torch.tensor([0.2, 0.5, 0.3])
    means = torch.tensor([[-2.0, 0.0, 1.0], [1.5, 1.0, -1.0], [0.0, -2.0, 0.5]])[:, :d]
    variances = torch.tensor([[0.3, 0.5, 0.2], [0.4, 0.2, 0.6], [0.8, 0.3, 0.3]])[:, :d]
    prior = LatentPrior(weights, means, variances, "gmm")
    ref = MixtureSameFamily(
        Categorical(probs=weights.double()),
        Independent(Normal(means.double(), variances.double().sqrt()), 1),
    )
    return prior, ref


def test_defaults_are_the_released_code_weights():
    assert DEFAULT_BETA == 7.5e-5 and DEFAULT_GAMMA == 1.0


def test_gaussian_kl_both_directions_and_standard_normal():
    mu_q, lv_q = _posterior(seed=1)
    mu_p, lv_p = _posterior(seed=2)
    q = Normal(mu_q, (0.5 * lv_q).exp())
    p = Normal(mu_p, (0.5 * lv_p).exp())
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), kl_divergence(q, p))
    torch.testing.assert_close(gaussian_kl(mu_p, lv_p, mu_q, lv_q), kl_divergence(p, q))
    std = Normal(torch.zeros_like(mu_q), torch.ones_like(mu_q))
    torch.testing.assert_close(standard_normal_kl(mu_q, lv_q), kl_divergence(q, std))
    # averaged over batch and latent elements (the released code's reduction)
    torch.testing.assert_close(kl_loss(mu_q, lv_q).double(), kl_divergence(q, std).mean())
    torch.testing.assert_close(
        kl_loss(mu_q, lv_q, direction="forward").double(), kl_divergence(std, q).mean()
    )


def test_kl_to_a_gaussian_prior_is_closed_form_in_each_direction():
    mu_q, lv_q = _posterior(seed=3)
    prior = LatentPrior(
        torch.ones(1), torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.3, 2.0, 0.7]]), "gaussian"
    )
    q = Normal(mu_q, (0.5 * lv_q).exp())
    p = Normal(prior.means[0].double(), prior.variances[0].double().sqrt())
    rev = kl_loss(mu_q.float(), lv_q.float(), prior, "reverse")
    fwd = kl_loss(mu_q.float(), lv_q.float(), prior, "forward")
    torch.testing.assert_close(rev.double(), kl_divergence(q, p).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fwd.double(), kl_divergence(p, q).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.isclose(rev, fwd)  # the two directions really differ here


def test_monte_carlo_kl_matches_the_closed_form_for_one_component():
    mu_q, lv_q = _posterior(seed=4)
    prior = LatentPrior(
        torch.ones(1), torch.tensor([[0.2, -0.4, 1.0]]), torch.tensor([[0.5, 1.5, 0.8]]), "gmm"
    )
    lv_p = prior.variances.log()
    g = torch.Generator().manual_seed(0)
    for direction, exact in (
        ("reverse", gaussian_kl(mu_q, lv_q, prior.means.double(), lv_p.double()).sum(1)),
        ("forward", gaussian_kl(prior.means.double(), lv_p.double(), mu_q, lv_q).sum(1)),
    ):
        est = monte_carlo_kl(mu_q, lv_q, prior, direction, n_samples=200_000, generator=g)
        torch.testing.assert_close(est.double(), exact, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_monte_carlo_kl_to_a_gmm_against_torch_distributions(direction):
    mu_q, lv_q = _posterior(seed=5)
    prior, ref = _gmm()
    q = Independent(Normal(mu_q, (0.5 * lv_q).exp()), 1)
    torch.manual_seed(1)
    if direction == "reverse":
        z = q.sample((400_000,))  # [S, B, d]
        terms = q.log_prob(z) - ref.log_prob(z)
    else:
        z = ref.sample((400_000,))[:, None, :]  # [S, 1, d]
        terms = ref.log_prob(z) - q.log_prob(z)
    expected, se = terms.mean(0), terms.std(0) / math.sqrt(terms.shape[0])
    g = torch.Generator().manual_seed(2)
    ours = monte_carlo_kl(mu_q, lv_q, prior, direction, n_samples=100_000, generator=g).double()
    # two independent estimates: their difference has SE sqrt(se^2 + (2 se)^2) ~ 2.3 se
    assert ((ours - expected).abs() < 6 * 2.3 * se + 1e-3).all(), (ours, expected, se)
    # kl_loss: total / d_z, averaged over the batch
    g = torch.Generator().manual_seed(3)
    per_elem = kl_loss(mu_q, lv_q, prior, direction, n_samples=50_000, generator=g).double()
    assert abs(per_elem - expected.mean() / 3) < 0.02


def test_reverse_monte_carlo_kl_is_reparameterised():
    mu_q, lv_q = _posterior(seed=6)
    mu_q.requires_grad_(True)
    lv_q.requires_grad_(True)
    prior, _ = _gmm()
    monte_carlo_kl(mu_q, lv_q, prior, "reverse", 16).sum().backward()
    assert mu_q.grad.abs().sum() > 0 and lv_q.grad.abs().sum() > 0


def test_prior_log_prob_matches_mixture_same_family():
    prior, ref = _gmm()
    z = torch.randn(50, 3, dtype=torch.float64) * 2
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z), rtol=1e-5, atol=1e-5)


def test_imq_kernel_and_unbiased_mmd_against_direct_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64) + 0.5
    c = 2.0 * 4 * 1.3
    k = lambda a, b: c / (c + ((a - b) ** 2).sum())  # noqa: E731
    torch.testing.assert_close(
        imq_kernel(x, y, c), torch.tensor([[k(a, b) for b in y] for a in x], dtype=torch.float64)
    )
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(a, b) for a in x for b in y) / (6 * 5)
    torch.testing.assert_close(mmd_imq(x, y, prior_variance=1.3), xx + yy - 2 * xy)


def test_mmd_is_zero_in_expectation_for_identical_distributions():
    g = torch.Generator().manual_seed(0)
    same = torch.stack(
        [
            mmd_imq(torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g))
            for _ in range(400)
        ]
    ).double()
    mean, se = same.mean(), same.std() / math.sqrt(len(same))
    assert abs(mean) < 4 * se, (mean, se)
    shifted = torch.stack(
        [
            mmd_imq(torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g) + 0.5)
            for _ in range(50)
        ]
    ).double()
    assert shifted.mean() > 10 * (shifted.std() / math.sqrt(len(shifted)))


def test_reconstruction_loss_ignores_masked_dims():
    g = torch.Generator().manual_seed(0)
    recon = torch.randn(3, 5, 4, generator=g) * 2
    target = torch.randn(3, 5, 4, generator=g)
    torch.testing.assert_close(reconstruction_loss(recon, target), F.smooth_l1_loss(recon, target))
    mask = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]])
    keep = mask.bool().unsqueeze(1).expand_as(recon)
    torch.testing.assert_close(
        reconstruction_loss(recon, target, mask), F.smooth_l1_loss(recon[keep], target[keep])
    )
    junk = recon.clone()
    junk[~keep] = 1e6
    torch.testing.assert_close(
        reconstruction_loss(junk, target, mask), reconstruction_loss(recon, target, mask)
    )


def _fake_output(z, mu, logvar, recon):
    return VAEOutput(recon, mu, logvar, z)


def test_stage_losses_combine_their_terms():
    g = torch.Generator().manual_seed(0)
    b, d = 16, 3
    mu, logvar = torch.randn(b, d, generator=g), 0.3 * torch.randn(b, d, generator=g)
    z = mu + (0.5 * logvar).exp() * torch.randn(b, d, generator=g)
    target = torch.randn(b, 4, 2, generator=g)
    out = _fake_output(z, mu, logvar, target + 0.1)
    t = stage1_loss(out, target, beta=0.3, gamma=2.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(t.total, t.recon + 0.3 * t.kl + 2.0 * t.mmd)
    torch.testing.assert_close(t.kl, kl_loss(mu, logvar))
    torch.testing.assert_close(t.recon, reconstruction_loss(out.recon, target))
    ref_mmd = mmd_imq(z, torch.randn(b, d, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(t.mmd, ref_mmd)


def test_stage2_mmd_target_depends_on_the_direction():
    prior, _ = _gmm()
    g = torch.Generator().manual_seed(0)
    z = prior.sample(256, g)  # latents distributed exactly as the prior
    out = _fake_output(z, z, torch.full_like(z, -4.0), torch.zeros(256, 2, 2))
    rev = stage2_loss(out, torch.zeros(256, 2, 2), prior, kl="reverse", generator=g)
    fwd = stage2_loss(out, torch.zeros(256, 2, 2), prior, kl="forward", generator=g)
    assert abs(rev.mmd) < 0.01  # MMD against p_pre: same law
    assert fwd.mmd > 0.05  # the released code's MMD against N(0, I): a different law
    torch.testing.assert_close(rev.total, rev.recon + DEFAULT_BETA * rev.kl + rev.mmd)
    with pytest.raises(ValueError, match="kl: expected one of"):
        stage2_loss(out, torch.zeros(256, 2, 2), prior, kl="symmetric")


def test_reconstruction_loss_leaves_padded_steps_out():
    """``steps`` [B, H] (0 = padding past the episode's end): the mean runs over the real
    steps' kept dims only, in float64 against the selected elements; values at padded
    steps change nothing, and their gradient is exactly zero."""
    g = torch.Generator().manual_seed(1)
    recon = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 2
    target = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    steps = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    mask = torch.tensor([1.0, 0, 1, 1])
    keep = steps.bool()[:, :, None] & mask.bool()[None, None, :]
    torch.testing.assert_close(
        reconstruction_loss(recon, target, mask, steps=steps),
        F.smooth_l1_loss(recon[keep], target[keep]),
        rtol=1e-14,
        atol=0,
    )
    only_steps = steps.bool()[:, :, None].expand_as(recon)
    torch.testing.assert_close(
        reconstruction_loss(recon, target, steps=steps),
        F.smooth_l1_loss(recon[only_steps], target[only_steps]),
        rtol=1e-14,
        atol=0,
    )
    junk = recon.clone().requires_grad_(True)
    with torch.no_grad():
        junk[~only_steps] = 1e6
    loss = reconstruction_loss(junk, target, mask, steps=steps)
    torch.testing.assert_close(loss, reconstruction_loss(recon, target, mask, steps=steps))
    loss.backward()
    assert torch.all(junk.grad[~only_steps] == 0) and junk.grad[keep].abs().sum() > 0
    ones = torch.ones(3, 5)  # all steps real: the loss without steps, exactly
    unmasked = reconstruction_loss(recon, target, mask)
    assert torch.equal(reconstruction_loss(recon, target, mask, steps=ones), unmasked)
    with pytest.raises(ValueError, match=r"steps: expected shape \[B, H\]=\[3, 5\], got \[3, 4\]"):
        reconstruction_loss(recon, target, steps=torch.ones(3, 4))


def test_stage_losses_pass_the_steps_to_the_reconstruction():
    g = torch.Generator().manual_seed(2)
    b, h, d, dz = 6, 4, 3, 2
    mu, logvar = torch.randn(b, dz, generator=g), 0.1 * torch.randn(b, dz, generator=g)
    out = _fake_output(mu.clone(), mu, logvar, torch.randn(b, h, d, generator=g))
    target = torch.randn(b, h, d, generator=g)
    steps = (torch.arange(h)[None, :] < torch.tensor([4, 4, 3, 2, 1, 4])[:, None]).float()
    want = reconstruction_loss(out.recon, target, steps=steps)
    one = stage1_loss(out, target, generator=torch.Generator().manual_seed(0), steps=steps)
    assert torch.equal(one.recon, want)
    assert not torch.equal(want, reconstruction_loss(out.recon, target))
    prior = LatentPrior.standard_normal(dz)
    two = stage2_loss(out, target, prior, generator=torch.Generator().manual_seed(0), steps=steps)
    assert torch.equal(two.recon, want)
