"""Bad input to Steer and LatentGuidance: clear errors that name the argument."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ate_fast.steer import LatentGuidance, Steer

B, H, D, DZ = 2, 4, 3, 5


def encoder():
    return nn.Sequential(nn.Flatten(), nn.Linear(H * D, DZ))  # returns mu only


def chunk():
    return torch.randn(B, H, D)


def flow_args(**override):
    args = dict(v_pred=chunk(), x_t=chunk(), a0=chunk(), noise=chunk(), t=torch.rand(B))
    args.update(override)
    return args


def diffusion_args(**override):
    args = dict(
        pred=chunk(), x_k=chunk(), a0=chunk(), noise=chunk(),
        timesteps=torch.tensor([0, 9]), schedule=SimpleNamespace(alphas_cumprod=torch.rand(10)),
    )  # fmt: skip
    args.update(override)
    return args


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(latent="median"), "latent"),
        (dict(reduction="sum"), "reduction"),
        (dict(scale=math.nan), "scale"),
        (dict(clamp=-0.1), "clamp"),
        (dict(clamp=math.nan), "clamp"),
    ],
)
def test_bad_steer_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Steer(encoder(), **kwargs)


def test_not_an_encoder():
    with pytest.raises(TypeError, match="vae_or_encoder"):
        Steer(42)


def test_sample_latent_needs_logvar():
    with pytest.raises(ValueError, match="logvar"):
        Steer(encoder(), latent="sample").guidance(chunk(), chunk())


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda a: a.reshape(B, 1, -1), r"mu of shape \[B, d_z\]"),
        (lambda a: (a.flatten(1), a.flatten(1)[:, :3]), "logvar"),
        (lambda a: (a.flatten(1), a, a), "vae_or_encoder must return"),
        (lambda a: "mu", "vae_or_encoder must return"),
    ],
)
def test_bad_encoder_outputs(fn, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Steer(fn).guidance(chunk(), chunk())


def test_unknown_prediction_type_and_convention():
    steer = Steer(encoder())
    with pytest.raises(ValueError, match="prediction_type"):
        steer.diffusion_loss(**diffusion_args(), prediction_type="score")
    with pytest.raises(ValueError, match="convention"):
        steer.flow_loss(**flow_args(), convention="rectified")
    with pytest.raises(ValueError, match="loss_reduction"):
        steer.flow_loss(**flow_args(), loss_reduction="sum")


@pytest.mark.parametrize("name", ["v_pred", "x_t", "a0", "noise"])
def test_flow_mismatched_shapes_and_nan(name):
    steer = Steer(encoder())
    with pytest.raises(ValueError, match=name):
        steer.flow_loss(**flow_args(**{name: torch.randn(B, H + 1, D)}))
    bad = chunk()
    bad[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        steer.flow_loss(**flow_args(**{name: bad}))


@pytest.mark.parametrize("name", ["pred", "x_k", "a0", "noise"])
def test_diffusion_mismatched_shapes_and_nan(name):
    steer = Steer(encoder())
    with pytest.raises(ValueError, match=name):
        steer.diffusion_loss(**diffusion_args(**{name: torch.randn(B + 1, H, D)}))
    bad = chunk()
    bad[0, 0, 2] = math.inf
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        steer.diffusion_loss(**diffusion_args(**{name: bad}))


def test_chunks_must_be_three_dimensional():
    with pytest.raises(ValueError, match=r"v_pred must be an action chunk \[B, H, D\]"):
        Steer(encoder()).flow_loss(**flow_args(v_pred=torch.randn(B, H * D)))


def test_bad_t():
    steer = Steer(encoder())
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        steer.flow_loss(**flow_args(t=torch.rand(B, 1, 1)))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        steer.flow_loss(**flow_args(t=torch.tensor([0.5, 1.5])))
    with pytest.raises(ValueError, match="t contains NaN"):
        steer.flow_loss(**flow_args(t=torch.tensor([0.5, math.nan])))
    with pytest.raises(TypeError, match="t must be a floating"):
        steer.flow_loss(**flow_args(t=torch.tensor([0, 1])))


def test_bad_timesteps_and_schedule():
    steer = Steer(encoder())
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 10\)"):
        steer.diffusion_loss(**diffusion_args(timesteps=torch.tensor([3, 10])))
    with pytest.raises(ValueError, match=r"timesteps must lie"):
        steer.diffusion_loss(**diffusion_args(timesteps=torch.tensor([-1, 3])))
    with pytest.raises(TypeError, match="timesteps must be an integer"):
        steer.diffusion_loss(**diffusion_args(timesteps=torch.tensor([0.5, 0.2])))
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\]"):
        steer.diffusion_loss(**diffusion_args(timesteps=torch.tensor([1, 2, 3])))
    with pytest.raises(TypeError, match="schedule must have an alphas_cumprod"):
        steer.diffusion_loss(**diffusion_args(schedule=object()))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        steer.diffusion_loss(**diffusion_args(schedule=torch.rand(3, 3)))


def test_checks_can_be_turned_off():
    steer = Steer(encoder(), check_inputs=False)
    bad = chunk()
    bad[0, 0, 0] = math.nan
    loss, _ = steer.flow_loss(**flow_args(noise=bad))
    assert math.isnan(loss.item())


def test_latent_guidance_bad_input():
    enc = encoder()
    x = chunk()
    with pytest.raises(ValueError, match="mode"):
        LatentGuidance(enc, torch.zeros(DZ), mode="score")
    with pytest.raises(TypeError, match="target"):
        LatentGuidance(enc, SimpleNamespace(loc=torch.zeros(DZ)))
    with pytest.raises(ValueError, match="target contains NaN"):
        LatentGuidance(enc, torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="target"):
        LatentGuidance(enc, torch.zeros(1, 2, DZ))
    with pytest.raises(ValueError, match=r"target must be a latent \[d_z\] = \[5\]"):
        LatentGuidance(enc, torch.zeros(DZ + 1)).gradient(x, x, torch.ones(B))
    with pytest.raises(ValueError, match="target is a batch of 3"):
        LatentGuidance(enc, torch.zeros(3, DZ)).gradient(x, x, torch.ones(B))
    tweedie = LatentGuidance(enc, torch.zeros(DZ), mode="tweedie")
    with pytest.raises(ValueError, match=r"dx0_dx must have shape \[B\]"):
        tweedie.gradient(x, x, torch.ones(B, 1))
    with pytest.raises(ValueError, match="x0_hat must have x's shape"):
        tweedie.gradient(x, torch.randn(B, H, D + 1), torch.ones(B))


@pytest.mark.parametrize("source", ["vae", "encoder"])
def test_mlp_encoder_refuses_a_transposed_chunk(source):
    """The fused MLP kernel checks only H·D: a [B, D, H] chunk took the fused path and was
    read as [B, H, D]. It now gets the encoder's own shape error, as every other path does."""
    from ate_fast.align import ActionVAE

    torch.manual_seed(0)
    vae = ActionVAE(3, 4, latent_dim=8, arch="mlp", hidden_dims=(16,)).double()
    steer = Steer(vae if source == "vae" else vae.encoder)
    assert steer.encoder.gradient_path == "mlp_fused"
    x, a0 = torch.randn(2, 2, 3, 4, dtype=torch.float64)  # [B, D, H]: transposed
    with pytest.raises(ValueError, match=r"a: expected \[B, H, D\]=\[B, 4, 3\].*got \(2, 3, 4\)"):
        steer.guidance(x, a0)
    guidance = LatentGuidance(vae, target=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a: expected \[B, H, D\]=\[B, 4, 3\]"):
        guidance.gradient(x, x, None)
    g = steer.guidance(x.transpose(1, 2), a0.transpose(1, 2))  # [B, H, D]: still fused, fine
    assert g.shape == (2, 4, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="mean"), r"reduction must be one of \('sample', 'batch'\), got 'mean'"),
    (dict(latent="Sample"), r"latent must be one of \('mean', 'sample'\), got 'Sample'"),
])  # fmt: skip
def test_latent_distance_gradient_checks_its_choices(kwargs, match):
    """The paths test `== "sample"`: reduction="mean" ran as "batch", and an unknown latent
    as "mean" on the fused path but as "sample" on the autograd path."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer import latent_distance_gradient
    from ate_fast.steer.encoder import FrozenEncoder

    encoder = FrozenEncoder(ActionVAE(3, 4, latent_dim=8, arch="mlp", hidden_dims=(16,)))
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=match):
        latent_distance_gradient(encoder, x, torch.zeros(8), eps=torch.randn(2, 8), **kwargs)
