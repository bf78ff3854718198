"""Guidance gradient through the MLP encoder: fused op vs autograd (and the op-by-op
decomposition), B ∈ {1, 8, 64}, (H, D) ∈ {(50, 32), (64, 128), (16, 14)}.

Run:  pytest benchmarks/bench_guidance.py --benchmark-json=bench_guidance.json
      python benchmarks/report.py bench_guidance.json

Encoder: H·D → 256 → 256 → 2·64 (GELU), the PERFORMANCE.md reference encoder. The
``eager`` row is autograd (what ``Steer``/``LatentGuidance`` did before the fused op):
one forward, ``torch.autograd.grad``. On the GPU the fused op has two rows: ``cuda`` (one
cooperative kernel; ``cuda_unroll16``: the same with ``ATE_FAST_MLP_GUIDANCE_UNROLL=16``, four
times the weight loads in flight per thread) and ``triton`` (2·L = 6 kernels,
``ate_fast/ops/mlp_guidance/triton.py``).
At B ∈ {1, 8} the GPU also has ``<row>_graph`` rows: the same call captured once in a CUDA
graph and replayed, as a captured sampler runs it (no Python launch path: at control-rate
batches that path, not the kernels, sets the plain rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_graphs import graphed

from ate_fast.ops import backends, mlp_guidance_reference
from ate_fast.ops.mlp_guidance import mlp_guidance

HIDDEN, DZ = (256, 256), 64
SHAPES = [(50, 32), (64, 128), (16, 14)]
BATCHES = [1, 8, 64]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_CALLS = 20


def _encoder(features, device):
    dims = [features, *HIDDEN, 2 * DZ]
    weights = [torch.randn(o, i, device=device) / i**0.5 for i, o in zip(dims[:-1], dims[1:])]
    biases = [torch.randn(o, device=device) * 0.1 for o in dims[1:]]
    return weights, biases


def _autograd(x, weights, biases, target):
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        h = xx.flatten(1)
        for i, (w, b) in enumerate(zip(weights, biases)):
            h = F.linear(h, w, b)
            if i < len(weights) - 1:
                h = F.gelu(h)
        y = -((h[:, :DZ] - target) ** 2).mean(dim=1).sum()
        return torch.autograd.grad(y, xx)[0]


def _cases():
    for device in DEVICES:
        for horizon, dim in SHAPES:
            for batch in BATCHES:
                # cuda_unroll16: the kernel with ATE_FAST_MLP_GUIDANCE_UNROLL=16
                fused = ["cpu"] if device == "cpu" else ["cuda", "cuda_unroll16", "triton"]
                impls = ["eager", "ref", *fused]
                if device == "cuda" and batch <= 8:
                    impls += [f"{impl}_graph" for impl in impls]
                for impl in impls:
                    yield pytest.param(
                        device, batch, horizon, dim, impl,
                        id=f"{device}-B{batch}-H{horizon}-D{dim}-{impl}",
                    )  # fmt: skip


@pytest.mark.parametrize(("device", "batch", "horizon", "dim", "impl"), list(_cases()))
def test_guidance_gradient(benchmark, time_calls, monkeypatch, device, batch, horizon, dim, impl):
    weights, biases = _encoder(horizon * dim, device)
    x = torch.randn(batch, horizon, dim, device=device)
    target = torch.randn(DZ, device=device)
    path = impl.removesuffix("_graph")
    if path == "cuda_unroll16":
        monkeypatch.setenv("ATE_FAST_MLP_GUIDANCE_UNROLL", "16")
        path = "cuda"
    if path == "eager":
        fn = lambda: _autograd(x, weights, biases, target)  # noqa: E731
    elif path == "ref":
        fn = lambda: mlp_guidance_reference(  # noqa: E731
            x, weights, biases, "gelu", target, distance_weight=1 / DZ
        )[0]
    else:
        ok, why = backends.availability(path, device)
        if not ok:
            pytest.skip(f"{path} backend unavailable: {why}")
        monkeypatch.setenv("ATE_FAST_BACKEND", path)
        backends.reset_caches()
        fn = lambda: mlp_guidance(  # noqa: E731
            x, weights, biases, "gelu", target=target, distance_weight=1 / DZ
        )[0]
    if impl.endswith("_graph"):
        fn = graphed(fn)
    expected = _autograd(x, weights, biases, target)
    error = ((fn() - expected).norm() / expected.norm()).item()
    assert error < 1e-4, f"{impl}: relative error {error}"
    benchmark.group = f"{device} guidance B={batch} H={horizon} D={dim}"
    benchmark.extra_info.update(impl=impl, device=device, batch=batch, horizon=horizon, dim=dim)
    time_calls(fn, device, GPU_CALLS, rounds=20)
    backends.reset_caches()
