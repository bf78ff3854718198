"""Steer.guidance and LatentGuidance: finite differences, transcriptions, encoder forms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ate_fast.steer import Guidance, LatentGuidance, Steer

B, H, D, DZ = 3, 5, 2, 4
F64 = torch.float64


class TinyEncoder(nn.Module):
    """forward(a) -> (mu, logvar): a module encoder (no .encode)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(H * D, 12), nn.Tanh(), nn.Linear(12, 2 * DZ)
        )

    def forward(self, a):
        mu, logvar = self.net(a).chunk(2, dim=-1)
        return mu, logvar


def make_encoder() -> TinyEncoder:
    return TinyEncoder().to(F64)


def y_of(encoder, x, z_target, eps=None):
    """y(x) per sample, −(1/N)‖E(x) − z*‖², written from ATE_METHOD.md -> [B]."""
    mu, logvar = encoder(x)
    z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps
    return -((z - z_target) ** 2).sum(dim=1) / DZ


def finite_difference(f, x, h=1e-6):
    """Central differences of sum_i f(x)_i: each sample's y depends on its own row only."""
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for k in range(flat.numel()):
        old = flat[k].item()
        flat[k] = old + h
        up = f(x).sum()
        flat[k] = old - h
        down = f(x).sum()
        flat[k] = old
        gflat[k] = (up - down) / (2 * h)
    return grad


# ----------------------------------------------------------------------------------
# Steer.guidance
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("latent", ["mean", "sample"])
def test_steer_guidance_matches_finite_differences(latent):
    enc = make_encoder()
    x, a0 = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    eps = None
    if latent == "sample":
        eps = torch.randn((B, DZ), generator=torch.Generator().manual_seed(1), dtype=F64)
    g = Steer(enc, latent=latent).guidance(x, a0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu0, logvar0 = enc(a0)
        z0 = mu0 if eps is None else mu0 + torch.exp(0.5 * logvar0) * eps
        expected = finite_difference(lambda v: y_of(enc, v, z0, eps), x.clone())
    assert g.shape == (B, H, D) and not g.requires_grad
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)


def test_sample_latent_shares_eps_between_x_and_a0():
    """With one ε for both encodings, y has its maximum at x = a0, so g vanishes there;
    two independent draws would leave a non-zero gradient."""
    enc = make_encoder()
    a0 = torch.randn(B, H, D, dtype=F64)
    g = Steer(enc, latent="sample").guidance(a0.clone(), a0)
    assert g.abs().max() == 0
    g_near = Steer(enc, latent="sample").guidance(a0 + 0.1, a0)
    assert g_near.abs().max() > 0


def test_encoder_forms_agree():
    enc = make_encoder()
    x, a0 = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    reference = Steer(enc).guidance(x, a0)
    forms = [
        lambda a: enc(a)[0],  # a callable returning mu only
        SimpleNamespace(encode=enc),  # an object with .encode (not a module)
        SimpleNamespace(encode=lambda a: list(enc(a))),  # (mu, logvar) as a list
    ]
    for form in forms:
        torch.testing.assert_close(Steer(form).guidance(x, a0), reference, rtol=0, atol=0)


def test_guidance_under_no_grad_and_inference_mode():
    enc = make_encoder()
    x, a0 = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    steer = Steer(enc)
    reference = steer.guidance(x, a0)
    with torch.no_grad():
        torch.testing.assert_close(steer.guidance(x, a0), reference, rtol=0, atol=0)
    with torch.inference_mode():
        xi, ai = x.clone(), a0.clone()  # inference tensors
        got = steer.guidance(xi, ai)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


# ----------------------------------------------------------------------------------
# LatentGuidance
# ----------------------------------------------------------------------------------
def transcribed_latent_gradient(enc, point, z_target):
    rows = []
    for i in range(point.shape[0]):
        p = point[i : i + 1].detach().clone().requires_grad_(True)
        zt = z_target if z_target.ndim == 1 else z_target[i]
        y = -((enc(p)[0][0] - zt) ** 2).sum() / DZ
        rows.append(torch.autograd.grad(y, p)[0])
    return torch.cat(rows)


@pytest.mark.parametrize("target_form", ["latent", "batch", "prior"])
def test_latent_guidance_direct_matches_transcription(target_form):
    enc = make_encoder()
    z_star = torch.randn(DZ, dtype=F64)
    target = {
        "latent": z_star,
        "batch": z_star.expand(B, DZ) + torch.randn(B, DZ, dtype=F64),
        "prior": SimpleNamespace(mean=z_star, var=torch.ones(DZ)),
    }[target_form]
    guidance = LatentGuidance(enc, target, scale=1.5, clamp=0.2, mode="direct")
    x = torch.randn(B, H, D, dtype=F64)
    x0_hat, dx0_dx = torch.randn(B, H, D, dtype=F64), torch.rand(B, dtype=F64) + 0.5
    g = guidance.gradient(x, x0_hat, dx0_dx)
    z_ref = target if isinstance(target, torch.Tensor) else z_star
    torch.testing.assert_close(g, transcribed_latent_gradient(enc, x, z_ref), rtol=1e-12, atol=0)
    with torch.no_grad():
        expected = finite_difference(lambda v: y_of(enc, v, z_ref), x.clone())
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)


def test_latent_guidance_tweedie_matches_transcription():
    enc = make_encoder()
    z_star = torch.randn(DZ, dtype=F64)
    guidance = LatentGuidance(enc, z_star, scale=2.0, clamp=0.1, mode="tweedie")
    x, x0_hat = torch.randn(B, H, D, dtype=F64), torch.randn(B, H, D, dtype=F64)
    dx0_dx = torch.tensor([0.5, 1.0, 7.0], dtype=F64)
    g = guidance.gradient(x, x0_hat, dx0_dx)
    expected = dx0_dx.view(-1, 1, 1) * transcribed_latent_gradient(enc, x0_hat, z_star)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)
    # y is evaluated at x0_hat, not x
    assert not torch.allclose(g, guidance.gradient(x0_hat + 1, x, dx0_dx))


def test_latent_guidance_in_inference_mode_and_protocol():
    enc = make_encoder()
    with torch.inference_mode():
        z_star = torch.randn(DZ, dtype=F64)  # an inference tensor target
        guidance = LatentGuidance(enc, z_star, scale=2.0, clamp=math.inf)
        x = torch.randn(B, H, D, dtype=F64)
        g = guidance.gradient(x, x, torch.ones(B, dtype=F64))
    torch.testing.assert_close(
        g, transcribed_latent_gradient(enc, x.clone(), z_star.clone()), rtol=1e-12, atol=0
    )
    assert isinstance(guidance, Guidance)
    assert (guidance.scale, guidance.clamp, guidance.mode) == (2.0, math.inf, "direct")
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_latent_gradient_is_the_one_overridable_method():
    class Fused(LatentGuidance):
        def latent_gradient(self, point):
            return torch.full_like(point, 3.0)

    guidance = Fused(make_encoder(), torch.zeros(DZ, dtype=F64), mode="tweedie")
    x = torch.randn(B, H, D, dtype=F64)
    g = guidance.gradient(x, x, torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    torch.testing.assert_close(g[:, 0, 0], torch.tensor([3.0, 6.0, 12.0], dtype=F64))


def test_set_target_replaces_the_cached_target():
    enc = make_encoder()
    guidance = LatentGuidance(enc, torch.zeros(DZ, dtype=F64))
    x = torch.randn(B, H, D, dtype=F64)
    first = guidance.gradient(x, x, torch.ones(B, dtype=F64))
    z_new = torch.randn(DZ, dtype=F64) * 3
    guidance.set_target(z_new)
    second = guidance.gradient(x, x, torch.ones(B, dtype=F64))
    torch.testing.assert_close(second, transcribed_latent_gradient(enc, x, z_new))
    assert not torch.allclose(first, second)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["direct", "tweedie"])
def test_latent_guidance_replays_in_a_cuda_graph(mode):
    """The sampler captures its whole loop, guidance included: the autograd VJP must
    capture too (no host sync, target moved to the device once, before capture)."""
    enc = TinyEncoder().cuda()
    guidance = LatentGuidance(enc, torch.randn(DZ), mode=mode)
    x = torch.randn(B, H, D, device="cuda")
    x0_hat = torch.randn(B, H, D, device="cuda")
    dx0_dx = torch.rand(B, device="cuda") + 0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            guidance.gradient(x, x0_hat, dx0_dx)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        g = guidance.gradient(x, x0_hat, dx0_dx)
    x.copy_(torch.randn_like(x))
    x0_hat.copy_(torch.randn_like(x0_hat))
    graph.replay()
    torch.testing.assert_close(g, guidance.gradient(x, x0_hat, dx0_dx), rtol=1e-5, atol=1e-6)


def test_with_the_align_action_vae_and_latent_prior():
    """The contract with ate_fast.align: ActionVAE.encode(a, mask) and LatentPrior.mean."""
    from ate_fast.align.prior import LatentPrior
    from ate_fast.align.vae import ActionVAE

    vae = ActionVAE(D, H, DZ, arch="mlp", hidden_dims=(16,)).to(F64)
    prior = LatentPrior.from_latents(torch.randn(20, DZ), torch.randn(20, DZ) - 1)
    x = torch.randn(B, H, D, dtype=F64)
    guidance = LatentGuidance(vae, prior, mode="direct")
    expected = transcribed_latent_gradient(lambda a: vae.encode(a), x, prior.mean.to(F64))
    torch.testing.assert_close(guidance.gradient(x, x, torch.ones(B, dtype=F64)), expected)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    # the action mask zeroes the absent dims: no guidance reaches them
    mask = torch.tensor([1.0, 0.0], dtype=F64)
    g = Steer(vae, mask=mask).guidance(x, torch.randn(B, H, D, dtype=F64))
    assert g[..., 1].abs().max() == 0 and g[..., 0].abs().max() > 0


@pytest.mark.parametrize(
    ("arch", "path"), [("mlp", None), ("transformer", "vjp"), ("transformer", "autograd")]
)
def test_shared_target_with_sampled_latent(monkeypatch, arch, path):
    """A shared target [d_z] with latent="sample" (eps [B, d_z]) on every gradient path
    (fused MLP kernel, transformer VJP, autograd) equals the target broadcast to [B, d_z]."""
    from ate_fast.align.vae import ActionVAE
    from ate_fast.steer.encoder import FrozenEncoder
    from ate_fast.steer.latent_gradient import latent_distance_gradient

    if path is not None:
        monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", path)
    options = {"hidden_dims": (16,)} if arch == "mlp" else {"d_model": 16, "num_layers": 3}
    encoder = FrozenEncoder(ActionVAE(D, H, DZ, arch=arch, **options).to(F64))
    x, eps = torch.randn(B, H, D, dtype=F64), torch.randn(B, DZ, dtype=F64)
    target = torch.randn(DZ, dtype=F64)
    got = latent_distance_gradient(encoder, x, target, latent="sample", eps=eps)
    expected = latent_distance_gradient(
        encoder, x, target.expand(B, DZ).contiguous(), latent="sample", eps=eps
    )
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"eps must have mu's shape \(3, 4\)"):
        latent_distance_gradient(encoder, x, target, latent="sample", eps=eps[0])
