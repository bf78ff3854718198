"""Guidance gradient through the paper's Transformer encoder: autograd vs the hand-written
VJP (``ate_fast/steer/transformer_vjp.py``), eager and (CUDA) replayed as a CUDA graph.

Run:  pytest benchmarks/bench_transformer_guidance.py --benchmark-json=bench_tg.json
      python benchmarks/report.py bench_tg.json

Encoder: ``ActionVAE(D, H, latent_dim=512, arch="transformer")`` at the paper's size
(d_model 512, 4 heads, ff 1024, 9 layers; 21M encoder parameters), float32, TF32 off.
Rows (``impl``): ``eager`` (baseline) = forward + ``torch.autograd.grad`` (what
``latent_distance_gradient`` runs with ``ATE_FAST_TRANSFORMER_GUIDANCE=autograd``);
``vjp`` = the hand-written VJP; on CUDA also ``eager_graph`` / ``vjp_graph``: the same
call captured once in a ``torch.cuda.CUDAGraph`` and replayed — what a captured sampler
runs; ``compiled`` (CUDA also ``compiled_graph``) = the VJP through ``torch.compile``
(``ATE_FAST_TRANSFORMER_GUIDANCE=compiled``), at (H, D) = (50, 32) and B ≤ 8 only (each
shape compiles once, tens of seconds); on CUDA also ``triton`` / ``triton_graph``: the
VJP on the opt-in Triton kernels (``ATE_FAST_TRANSFORMER_GUIDANCE=triton``,
``ate_fast/steer/transformer_triton.py``; added without a GPU, never run on one), every
shape. B ∈ {1, 8, 64} × (H, D) ∈ {(50, 32), (64, 128),
(16, 14)} on CUDA; B ∈ {1, 8} on the CPU (B = 64 is ≈ 270 GFLOP per call there, seconds
per round; ``compiled`` at B = 1).
"""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import graphed

from ate_fast.align import ActionVAE
from ate_fast.steer import latent_distance_gradient
from ate_fast.steer.encoder import FrozenEncoder
from ate_fast.steer.transformer_vjp import ENV_VAR

SHAPES = [(50, 32), (64, 128), (16, 14)]
LATENT = 512
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_CALLS = 10


def _cases():
    """Per device: every shape with the uncompiled paths, then the compiled ones (last, so
    that a suite cut short by its time limit still has the rest)."""
    for device in DEVICES:
        batches = [1, 8] if device == "cpu" else [1, 8, 64]
        impls = ["eager", "vjp"]
        if device == "cuda":
            impls += ["eager_graph", "vjp_graph", "triton", "triton_graph"]
        cases = [(b, h, d, impl) for h, d in SHAPES for b in batches for impl in impls]
        compiled = ["compiled"] + (["compiled_graph"] if device == "cuda" else [])
        horizon, dim = SHAPES[0]
        cases += [
            (b, horizon, dim, impl)
            for b in ([1, 8] if device == "cuda" else [1])
            for impl in compiled
        ]
        for batch, horizon, dim, impl in cases:
            yield pytest.param(
                device, batch, horizon, dim, impl,
                id=f"{device}-B{batch}-H{horizon}-D{dim}-{impl}",
            )  # fmt: skip


@pytest.mark.parametrize(("device", "batch", "horizon", "dim", "impl"), list(_cases()))
def test_transformer_guidance_gradient(
    benchmark, time_calls, monkeypatch, device, batch, horizon, dim, impl
):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vae = ActionVAE(dim, horizon, latent_dim=LATENT, arch="transformer").to(device)
    encoder = FrozenEncoder(vae)
    x = torch.randn(batch, horizon, dim, device=device)
    target = torch.randn(LATENT, device=device)

    def call(path):
        monkeypatch.setenv(ENV_VAR, path)
        return lambda: latent_distance_gradient(encoder, x, target)

    expected = call("autograd")()
    fn = call({"eager": "autograd"}.get(impl.split("_")[0], impl.split("_")[0]))
    if impl.endswith("_graph"):
        fn = graphed(fn)
    error = ((fn() - expected).norm() / expected.norm()).item()
    assert error < 1e-4, f"{impl}: relative error {error}"
    benchmark.group = f"{device} transformer guidance B={batch} H={horizon} D={dim}"
    benchmark.extra_info.update(impl=impl, device=device, batch=batch, horizon=horizon, dim=dim)
    time_calls(fn, device, GPU_CALLS, rounds=10)
