"""ActionVAE: shapes, the paper's size, the MLP encoder's contract, masks, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ate_fast.align import ActionVAE, VAEOutput


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_transformer_size_and_one_forward():
    vae = ActionVAE(action_dim=32, horizon=50)  # π0's chunk, the paper's defaults
    total, enc = _params(vae), _params(vae.encoder)
    # ATE_METHOD.md: "About 52M parameters, 21M in the encoder".
    assert 51.0e6 < total < 53.0e6, total
    assert 20.5e6 < enc < 21.5e6, enc
    with torch.no_grad():
        out = vae(torch.randn(2, 50, 32))
    assert isinstance(out, VAEOutput)
    assert out.recon.shape == (2, 50, 32)
    assert out.mu.shape == out.logvar.shape == out.z.shape == (2, 512)


@pytest.mark.parametrize("arch", ["transformer", "mlp"])
def test_shapes_and_sampling(arch):
    kwargs = (
        {"d_model": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 3}
        if arch == "transformer"
        else {"hidden_dims": (32, 16)}
    )
    vae = ActionVAE(3, 6, 8, arch=arch, **kwargs)
    a = torch.randn(5, 6, 3)
    mu, logvar = vae.encode(a)
    assert mu.shape == logvar.shape == (5, 8)
    assert vae.decode(mu).shape == (5, 6, 3)
    det = vae(a, sample=False)
    torch.testing.assert_close(det.z, det.mu)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(vae(a, generator=g1).z, vae(a, generator=g2).z)
    assert not torch.allclose(vae(a).z, det.mu)
    # gradients reach every parameter
    out = vae(a)
    (out.recon.sum() + out.mu.sum() + out.logvar.sum()).backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_transformer_latent_dim_other_than_d_model():
    vae = ActionVAE(2, 4, 10, d_model=16, num_heads=2, ff_dim=32, num_layers=1)
    assert vae.encode(torch.randn(3, 4, 2))[0].shape == (3, 10)
    assert vae.decode(torch.randn(3, 10)).shape == (3, 4, 2)


def test_mlp_encoder_is_plain_linears_with_named_activation():
    vae = ActionVAE(4, 5, 6, arch="mlp", hidden_dims=(16, 12), activation="silu")
    enc = vae.encoder
    assert isinstance(enc.layers, nn.ModuleList)
    assert all(isinstance(layer, nn.Linear) for layer in enc.layers)
    assert [(lin.in_features, lin.out_features) for lin in enc.layers] == [
        (20, 16),
        (16, 12),
        (12, 12),
    ]
    assert enc.activation == "silu"
    assert ActionVAE(4, 5, 6, arch="mlp").encoder.activation == "gelu"
    assert [lin.out_features for lin in ActionVAE(4, 5, 6, arch="mlp").encoder.layers] == [
        512,
        512,
        12,
    ]
    a = torch.randn(3, 5, 4)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # by hand: mask, flatten [B, H*D], Linear-act-Linear-act-Linear, split (mu, logvar)
    x = (a * mask).reshape(3, 20)
    for i, layer in enumerate(enc.layers):
        x = layer(x)
        x = F.silu(x) if i < 2 else x
    mu, logvar = enc(a, mask)
    torch.testing.assert_close(mu, x[:, :6])
    torch.testing.assert_close(logvar, x[:, 6:])
    torch.testing.assert_close(enc((a * mask).reshape(3, 20)), (mu, logvar))


def test_gelu_is_the_exact_erf_form():
    vae = ActionVAE(1, 2, 1, arch="mlp", hidden_dims=(4,))
    x = torch.randn(7, 2)
    h = vae.encoder.layers[0](x)
    exact = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    out = torch.cat(vae.encoder(x), dim=1)
    torch.testing.assert_close(out, vae.encoder.layers[1](exact))


@pytest.mark.parametrize("arch", ["transformer", "mlp"])
def test_mask_hides_absent_dims(arch):
    kw = (
        {"d_model": 16, "num_heads": 2, "ff_dim": 32, "num_layers": 3}
        if arch == "transformer"
        else {}
    )
    vae = ActionVAE(4, 3, 5, arch=arch, **kw).eval()
    a = torch.randn(2, 3, 4)
    b = a.clone()
    b[..., 1] = 123.0  # junk in a dim the robot does not have
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(vae.encode(a, mask), vae.encode(b, mask))
    per_sample = torch.stack([mask, torch.ones(4)])
    mu_ps, _ = vae.encode(b, per_sample)
    torch.testing.assert_close(mu_ps[0], vae.encode(a, mask)[0][0])
    assert not torch.allclose(mu_ps[1], vae.encode(a, mask)[0][1])


def test_config_round_trip_and_errors():
    vae = ActionVAE(3, 4, 6, arch="mlp", hidden_dims=(8,))
    clone = ActionVAE.from_config(vae.config)
    assert clone.config == vae.config
    clone.load_state_dict(vae.state_dict())
    with pytest.raises(TypeError, match=r"unexpected arguments \['hidden_dims'\]"):
        ActionVAE(3, 4, 6, arch="transformer", hidden_dims=(8,))
    with pytest.raises(ValueError, match="arch: expected one of"):
        ActionVAE(3, 4, 6, arch="rnn")
    with pytest.raises(ValueError, match="num_layers: expected an odd number"):
        ActionVAE(3, 4, 6, num_layers=4)
    with pytest.raises(ValueError, match="activation: expected one of"):
        ActionVAE(3, 4, 6, arch="mlp", activation="swish")
    with pytest.raises(ValueError, match=r"a: expected \[B, H, D\]=\[B, 4, 3\], got \(2, 4, 5\)"):
        vae.encode(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"mask: expected shape \[D\]=\[3\] or \[B, D\]"):
        vae.encode(torch.randn(2, 4, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"z: expected \[B, d_z\]=\[B, 6\]"):
        vae.decode(torch.randn(2, 5))
