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

On CUDA also the encoder in bfloat16 (the issue's deployed precision: 42 MB of weights,
the samples float32, cast to the encoder's dtype), (H, D) = (50, 32), B ∈ {1, 8}: rows
``eager``, ``eager_graph``, ``vjp_graph``, ``triton_graph`` (the Triton attention's dots
on tensor cores), and ``triton_f64x64_graph`` / ``triton_f64x64_b32x64_graph``: the same
at other attention tiles (:data:`TILE_ROWS`: the encoder attention's forward and backward
took 7.0 and 7.4 µs per layer in π0's guided call on an H200 — four chunks of 16 keys per
program, one after another), in their own groups (``… bf16 B=…``), checked against the
float32 autograd gradient at 3e-2 (bf16's 8-bit mantissa, as the CUDA tests);
``triton_skinny_graph`` (the layers' projections on the few-row Triton GEMM,
``ATE_FAST_SKINNY_GEMM=triton``: x·Wᵀ forward, x·W backward) and
``triton_skinny_pdl_graph`` (and every kernel of a layer launched with programmatic
dependent launch, ``ATE_FAST_TRITON_PDL=on``; Hopper and later): never run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import graphed

from ate_fast.align import ActionVAE
from ate_fast.steer import latent_distance_gradient, transformer_triton
from ate_fast.steer.encoder import FrozenEncoder
from ate_fast.steer.transformer_vjp import ENV_VAR

SHAPES = [(50, 32), (64, 128), (16, 14)]
LATENT = 512
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_CALLS = 10


def _cases():
    """Per device: every shape with the uncompiled paths (on CUDA the bf16 cases right after
    the paper's shape), then the compiled ones (last, so that a suite cut short by its time
    limit still has the rest)."""
    for device in DEVICES:
        batches = [1, 8] if device == "cpu" else [1, 8, 64]
        impls = ["eager", "vjp"]
        if device == "cuda":
            impls += ["eager_graph", "vjp_graph", "triton", "triton_graph"]
        cases = [(b, h, d, impl, "float32") for h, d in SHAPES for b in batches for impl in impls]
        horizon, dim = SHAPES[0]
        if device == "cuda":  # right after the paper's shape in float32 (a cut suite keeps them)
            bf16 = ["eager", "eager_graph", "vjp_graph", "triton_graph", *TILE_ROWS,
                    *SETTING_ROWS]  # fmt: skip
            first = len(batches) * len(impls)
            cases[first:first] = [
                (b, horizon, dim, impl, "bfloat16") for b in [1, 8] for impl in bf16
            ]
        compiled = ["compiled"] + (["compiled_graph"] if device == "cuda" else [])
        cases += [
            (b, horizon, dim, impl, "float32")
            for b in ([1, 8] if device == "cuda" else [1])
            for impl in compiled
        ]
        for batch, horizon, dim, impl, dtype in cases:
            suffix = "" if dtype == "float32" else "-bf16"
            yield pytest.param(
                device, batch, horizon, dim, impl, dtype,
                id=f"{device}-B{batch}-H{horizon}-D{dim}-{impl}{suffix}",
            )  # fmt: skip


# the Triton kernels at other bf16 attention tiles (transformer_triton.CANDIDATE_TILES: at 52
# tokens one chunk of keys per program instead of four)
TILE_ROWS = {
    f"triton_{name}_graph": tiles for name, tiles in transformer_triton.CANDIDATE_TILES.items()
}

# the Triton path under the package's settings (bf16; at B = 8 the few-row GEMM does not
# take the 416 rows): the layers' projections on the few-row Triton GEMM, and then also
# every kernel of a layer launched with programmatic dependent launch (Hopper: where the
# GPU has none, the row fails)
SETTING_ROWS = {
    "triton_skinny_graph": {"ATE_FAST_SKINNY_GEMM": "triton"},
    "triton_skinny_pdl_graph": {"ATE_FAST_SKINNY_GEMM": "triton", "ATE_FAST_TRITON_PDL": "on"},
}

# relative error against float32 autograd: float32 rounding; bf16's 8-bit mantissa
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.mark.parametrize(("device", "batch", "horizon", "dim", "impl", "dtype"), list(_cases()))
def test_transformer_guidance_gradient(
    benchmark, time_calls, monkeypatch, device, batch, horizon, dim, impl, dtype
):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vae = ActionVAE(dim, horizon, latent_dim=LATENT, arch="transformer").to(device)
    x = torch.randn(batch, horizon, dim, device=device)
    target = torch.randn(LATENT, device=device)

    def call(path, encoder):
        monkeypatch.setenv(ENV_VAR, path)
        return lambda: latent_distance_gradient(encoder, x, target)

    expected = call("autograd", FrozenEncoder(vae))()  # float32: the reference
    encoder = FrozenEncoder(vae.to(getattr(torch, dtype)))
    if impl in TILE_ROWS:  # read at launch: the capture below keeps them
        for which, tiles in TILE_ROWS[impl].items():
            monkeypatch.setitem(transformer_triton.TILES[which], 2, tiles)
    for name, value in SETTING_ROWS.get(impl, {}).items():
        monkeypatch.setenv(name, value)
    fn = call({"eager": "autograd"}.get(impl.split("_")[0], impl.split("_")[0]), encoder)
    if impl.endswith("_graph"):
        fn = graphed(fn)
    error = ((fn() - expected).norm() / expected.norm()).item()
    assert error < TOLERANCE[dtype], f"{impl} ({dtype}): relative error {error}"
    precision = "" if dtype == "float32" else " bf16"
    benchmark.group = f"{device} transformer guidance{precision} B={batch} H={horizon} D={dim}"
    benchmark.extra_info.update(
        impl=impl, device=device, batch=batch, horizon=horizon, dim=dim, dtype=dtype
    )
    time_calls(fn, device, GPU_CALLS, rounds=10)
