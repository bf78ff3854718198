"""The hand-written VJP through the Transformer encoder equals autograd (float64), is
chosen only where it computes the encoder, and serves Steer and LatentGuidance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ate_fast.align import ActionVAE
from ate_fast.steer import LatentGuidance, Steer, latent_distance_gradient
from ate_fast.steer.encoder import FrozenEncoder
from ate_fast.steer.transformer_vjp import (
    ENV_VAR,
    selected_path,
    transformer_latent_gradient,
    vjp_function,
)

F64 = torch.float64
B = 3


def make_vae(horizon=6, dim=3, latent=16, layers=3, activation="gelu", d_model=32, seed=0):
    torch.manual_seed(seed)
    vae = ActionVAE(
        dim, horizon, latent_dim=latent, arch="transformer", d_model=d_model, num_heads=4,
        ff_dim=40, num_layers=layers, activation=activation,
    )  # fmt: skip
    # nonzero learned tokens and positions well away from init, so no path hides behind ~0
    with torch.no_grad():
        for p in vae.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.to(F64)


def gradient(path, monkeypatch, encoder, x, target, **kwargs):
    monkeypatch.setenv(ENV_VAR, path)
    return latent_distance_gradient(encoder, x, target, **kwargs)


CASES = [  # horizon, dim, latent (32 = d_model: identity heads), layers, activation
    pytest.param(6, 3, 16, 3, "gelu", id="H6-D3-heads-3layers"),
    pytest.param(5, 4, 32, 5, "gelu", id="identity-heads-5layers"),
    pytest.param(4, 2, 8, 1, "relu", id="one-layer-relu"),
    pytest.param(9, 1, 12, 7, "gelu", id="7layers-D1"),
]


@pytest.mark.parametrize(("horizon", "dim", "latent", "layers", "activation"), CASES)
@pytest.mark.parametrize("reduction", ["sample", "batch"])
@pytest.mark.parametrize("latent_mode", ["mean", "sample"])
def test_vjp_equals_autograd(
    monkeypatch, horizon, dim, latent, layers, activation, reduction, latent_mode
):
    vae = make_vae(horizon, dim, latent, layers, activation)
    encoder = FrozenEncoder(vae)
    x = torch.randn(B, horizon, dim, dtype=F64)
    target = torch.randn(B, latent, dtype=F64)
    eps = torch.randn(B, latent, dtype=F64) if latent_mode == "sample" else None
    kwargs = dict(latent=latent_mode, eps=eps, reduction=reduction)
    expected = gradient("autograd", monkeypatch, encoder, x, target, **kwargs)
    got = gradient("vjp", monkeypatch, encoder, x, target, **kwargs)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_shape", ["D", "BD"])
def test_vjp_applies_the_action_mask(monkeypatch, mask_shape):
    vae = make_vae(dim=4)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    if mask_shape == "BD":
        mask = torch.stack([mask, 1 - mask, torch.ones(4, dtype=F64)])
    encoder = FrozenEncoder(vae, mask=mask)
    x = torch.randn(B, 6, 4, dtype=F64)
    target = torch.randn(16, dtype=F64)
    expected = gradient("autograd", monkeypatch, encoder, x, target)
    got = gradient("vjp", monkeypatch, encoder, x, target)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    rows = mask if mask.ndim == 2 else mask.expand(B, -1)
    assert (got * (1 - rows).unsqueeze(1)).abs().max() == 0


def test_vjp_matches_finite_differences(monkeypatch):
    vae = make_vae(horizon=3, dim=2, latent=8, layers=3)
    encoder = FrozenEncoder(vae)
    x = torch.randn(2, 3, 2, dtype=F64)
    target = torch.randn(8, dtype=F64)

    def y(a):  # Σ_i −(1/d_z)‖μ(a_i) − z*‖²
        return -((vae.encode(a)[0] - target) ** 2).sum() / 8

    got = gradient("vjp", monkeypatch, encoder, x, target)
    numeric = torch.zeros_like(x)
    step = 1e-6
    for k in range(x.numel()):
        bump = torch.zeros_like(x).view(-1)
        bump[k] = step
        bump = bump.view_as(x)
        numeric.view(-1)[k] = (y(x + bump) - y(x - bump)) / (2 * step)
    torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-9)


def test_compiled_vjp_equals_autograd(monkeypatch):
    """The ``compiled`` path (the VJP through torch.compile/Inductor) on the CPU in float64:
    the same gradient as autograd, with a mask and a sampled latent, and it is what runs."""
    vae = make_vae(horizon=5, dim=3, latent=8, layers=3)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    encoder = FrozenEncoder(vae, mask=mask)
    x, target = torch.randn(B, 5, 3, dtype=F64), torch.randn(8, dtype=F64)
    eps = torch.randn(B, 8, dtype=F64)
    kwargs = dict(latent="sample", eps=eps)
    expected = gradient("autograd", monkeypatch, encoder, x, target, **kwargs)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = gradient("compiled", monkeypatch, encoder, x, target, **kwargs)
    assert expected.abs().max() > 0 and got[..., 1].abs().max() == 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert vjp_function("cpu") is not transformer_latent_gradient
    # dynamo compiled a graph for it (fullgraph=True: a graph break would have raised)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs


def test_steer_and_latent_guidance_take_the_vjp(monkeypatch):
    """Both public entry points give the autograd result through the VJP path."""
    vae = make_vae()
    x, a0 = torch.randn(B, 6, 3, dtype=F64), torch.randn(B, 6, 3, dtype=F64)
    steer = Steer(vae)
    guidance = LatentGuidance(vae, torch.randn(16, dtype=F64), mode="direct")
    results = {}
    for path in ("autograd", "vjp"):
        monkeypatch.setenv(ENV_VAR, path)
        with torch.inference_mode():  # the samplers call guidance in inference mode
            g_infer = guidance.gradient(x, x, torch.ones(B, dtype=F64))
        results[path] = (steer.guidance(x, a0), g_infer)
    for got, expected in zip(results["vjp"], results["autograd"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_selection(monkeypatch):
    vae = make_vae()
    x = torch.randn(B, 6, 3, dtype=F64)
    encoder = FrozenEncoder(vae)
    monkeypatch.setenv(ENV_VAR, "autograd")
    assert encoder.path_for(x) == "autograd"
    monkeypatch.setenv(ENV_VAR, "vjp")
    assert encoder.path_for(x) == "transformer_vjp" and encoder.transformer is vae.encoder
    # only where it computes exactly the encoder, else autograd
    assert encoder.path_for(x.float()) == "autograd"  # weights are float64
    assert encoder.path_for(torch.randn(B, 5, 3, dtype=F64)) == "autograd"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder.path_for(x) == "autograd"
    mlp = ActionVAE(3, 6, 16, arch="mlp", hidden_dims=(8,)).to(F64)
    assert FrozenEncoder(mlp).path_for(x) == "mlp_fused"  # its own kernel, not the VJP
    monkeypatch.setenv(ENV_VAR, "fused")
    with pytest.raises(ValueError, match=f"{ENV_VAR}: expected one of"):
        selected_path("cpu")
    monkeypatch.delenv(ENV_VAR)
    assert selected_path("cpu") == "vjp" and selected_path("cuda") == "vjp"
    assert selected_path("mps") == "autograd"  # not measured there


@pytest.mark.parametrize(
    "change",
    ["norm_first", "silu", "dropout_in_training", "not_batch_first"],
)
def test_unsupported_layers_keep_autograd(monkeypatch, change):
    vae = make_vae()
    layer = vae.encoder.blocks.middle_block
    if change == "norm_first":
        layer.norm_first = True
    elif change == "silu":
        layer.activation = nn.functional.silu
    elif change == "dropout_in_training":
        layer.dropout.p = 0.1
        vae.encoder.train()
    else:
        layer.self_attn.batch_first = False
    monkeypatch.setenv(ENV_VAR, "vjp")
    encoder = FrozenEncoder(vae, freeze=change != "dropout_in_training")
    assert encoder.path_for(torch.randn(B, 6, 3, dtype=F64)) == "autograd"


def test_bad_target_is_named(monkeypatch):
    vae = make_vae()
    monkeypatch.setenv(ENV_VAR, "vjp")
    with pytest.raises(ValueError, match=r"target must be a latent \[d_z\] = \[16\]"):
        latent_distance_gradient(
            FrozenEncoder(vae), torch.randn(B, 6, 3, dtype=F64), torch.randn(7, dtype=F64)
        )


def test_direct_call_shapes():
    """The function itself: [B, H, D] in, [B, H, D] out, contiguous, no autograd graph."""
    vae = make_vae()
    x = torch.randn(B, 6, 3, dtype=F64, requires_grad=True)
    with torch.no_grad():
        g = transformer_latent_gradient(vae.encoder, x, torch.zeros(16, dtype=F64))
    assert g.shape == x.shape and g.is_contiguous() and not g.requires_grad


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["vjp", "compiled", "triton"])
@pytest.mark.parametrize("latent_mode", ["mean", "sample"])
def test_vjp_on_cuda_matches_autograd_and_replays_in_a_graph(
    monkeypatch, no_tf32, latent_mode, path
):
    """float32 on the GPU (TF32 off): equal to autograd, and capturable in a CUDA graph
    as the sampler captures its loop (``compiled``: Inductor's kernels, compiled during
    the warm-up, replayed from the graph; ``triton``: ``transformer_triton``'s kernels,
    never run on a GPU before this test)."""
    vae = ActionVAE(32, 50, latent_dim=64, arch="transformer", d_model=128, num_layers=5).cuda()
    encoder = FrozenEncoder(vae)
    x = torch.randn(4, 50, 32, device="cuda")
    target = torch.randn(64, device="cuda")
    eps = torch.randn(4, 64, device="cuda") if latent_mode == "sample" else None
    kwargs = dict(latent=latent_mode, eps=eps)
    expected = gradient("autograd", monkeypatch, encoder, x, target, **kwargs)
    got = gradient(path, monkeypatch, encoder, x, target, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            latent_distance_gradient(encoder, x, target, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g = latent_distance_gradient(encoder, x, target, **kwargs)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(g, latent_distance_gradient(encoder, x, target, **kwargs))


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["vjp", "triton"])
def test_vjp_takes_a_host_mask_as_autograd_does(monkeypatch, no_tf32, path):
    """An action mask built on the CPU for an encoder on the GPU: autograd's encoder call
    and the fused MLP path move it to the chunk's device; the VJP paths raised a device
    mismatch."""
    vae = ActionVAE(6, 10, latent_dim=8, arch="transformer", d_model=32, num_layers=3).cuda()
    encoder = FrozenEncoder(vae, mask=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
    x, target = torch.randn(3, 10, 6, device="cuda"), torch.randn(8, device="cuda")
    expected = gradient("autograd", monkeypatch, encoder, x, target)
    got = gradient(path, monkeypatch, encoder, x, target)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert (got[..., [1, 4]] == 0).all()
