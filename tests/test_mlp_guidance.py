"""Fused MLP-encoder guidance gradient: every backend against autograd (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ate_fast.ops import backends, mlp_encoder_parts, mlp_guidance_reference
from ate_fast.ops.mlp_guidance import mlp_guidance, mlp_guidance_into, selected_backend

ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


def make_encoder(features, hidden, dz, dtype, device, bias_last=True):
    dims = [features, *hidden, 2 * dz]
    weights, biases = [], []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        weights.append((torch.randn(n_out, n_in, dtype=torch.float64) / n_in**0.5).to(dtype))
        last = i == len(dims) - 2
        b = torch.randn(n_out, dtype=torch.float64).to(dtype) if (bias_last or not last) else None
        biases.append(b)
    return [w.to(device) for w in weights], [None if b is None else b.to(device) for b in biases]


def autograd_truth(
    x, weights, biases, act, target=None, a0=None, mask=None, eps=None, distance_weight=1.0
):
    """g = ∇_x −distance_weight·‖z(x) − z*‖² by autograd, in float64."""
    up = [w.double().cpu() for w in weights]
    ub = [None if b is None else b.double().cpu() for b in biases]
    m = None if mask is None else mask.double().cpu()
    e = None if eps is None else eps.double().cpu()

    def latent(a):
        if m is not None:
            a = a * (m if m.dim() == 2 else m[None])[:, None, :]
        h = a.reshape(a.shape[0], -1)
        for i, (w, b) in enumerate(zip(up, ub)):
            h = F.linear(h, w, b)
            if i < len(up) - 1:
                h = ACTS[act](h)
        mu, logvar = h.chunk(2, dim=1)
        return mu if e is None else mu + torch.exp(0.5 * logvar) * e

    xx = x.double().cpu().requires_grad_(True)
    z = latent(xx)
    zt = latent(a0.double().cpu()) if a0 is not None else target.double().cpu()
    y = -distance_weight * ((z - zt) ** 2).sum()
    (g,) = torch.autograd.grad(y, xx)
    return g, z.detach()


CASES = [
    pytest.param("ref", "cpu", torch.float64, 1e-12, id="ref-f64"),
    pytest.param("cpu", "cpu", torch.float64, 1e-12, id="cpu-f64"),
    pytest.param("cpu", "cpu", torch.float32, 2e-5, id="cpu-f32"),
    pytest.param("cuda", "cuda", torch.float64, 1e-12, id="cuda-f64", marks=pytest.mark.cuda),
    pytest.param("cuda", "cuda", torch.float32, 2e-5, id="cuda-f32", marks=pytest.mark.cuda),
]


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize(
    ("batch", "horizon", "dim", "hidden", "dz"),
    [
        (1, 50, 32, (64, 48), 16),
        (3, 7, 5, (33,), 8),
        (9, 16, 14, (40, 24, 16), 4),
        (2, 4, 3, (), 6),
        (16, 50, 32, (256, 256), 64),  # enough work for the CPU kernel's OpenMP path
        (4, 5, 7, (33, 17), 5),  # CPU: the 4-row × 2-output forward with odd widths
        (13, 41, 31, (10, 9), 3),  # CPU: 8 + 4 + 1 rows; backward in two 1024-column blocks
    ],
    ids=["pi0-1", "odd-3", "dp-9", "linear-2", "parallel-16", "rows4-odd", "rows13-wide"],
)
def test_matches_autograd(backend, device, dtype, tol, act, batch, horizon, dim, hidden, dz):
    ok, why = backends.availability(backend, device)
    assert ok, why
    weights, biases = make_encoder(horizon * dim, hidden, dz, dtype, device)
    x = torch.randn(batch, horizon, dim, dtype=dtype, device=device)
    target = torch.randn(batch, dz, dtype=dtype, device=device)
    g = torch.full_like(x, float("nan"))
    z = torch.full((batch, dz), float("nan"), dtype=dtype, device=device)
    mlp_guidance_into(g, z, x, weights, biases, list(ACTS).index(act), target, None, None, None,
                      1.0 / dz, backend=backend)  # fmt: skip
    g_true, z_true = autograd_truth(
        x, weights, biases, act, target=target, distance_weight=1.0 / dz
    )
    assert not g.isnan().any() and not z.isnan().any(), "unwritten output elements"
    assert _rel(g, g_true) < tol
    assert _rel(z, z_true) < tol


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per-sample"])
@pytest.mark.parametrize("target_kind", ["latent", "batch", "a0"])
@pytest.mark.parametrize("with_eps", [False, True], ids=["mean", "sample"])
def test_options(backend, device, dtype, tol, mask_kind, target_kind, with_eps):
    batch, horizon, dim, dz = 5, 10, 6, 8
    weights, biases = make_encoder(horizon * dim, (32, 16), dz, dtype, device, bias_last=False)
    x = torch.randn(batch, horizon, dim, dtype=dtype, device=device)
    kw = {}
    if mask_kind == "shared":
        kw["mask"] = (torch.arange(dim, device=device) % 3 != 1).to(dtype)
    elif mask_kind == "per-sample":
        kw["mask"] = (torch.rand(batch, dim, device=device) > 0.3).to(dtype)
    if target_kind == "latent":
        kw["target"] = torch.randn(dz, dtype=dtype, device=device)
    elif target_kind == "batch":
        kw["target"] = torch.randn(batch, dz, dtype=dtype, device=device)
    else:
        kw["a0"] = torch.randn(batch, horizon, dim, dtype=dtype, device=device)
    if with_eps:
        kw["eps"] = torch.randn(batch, dz, dtype=dtype, device=device)
    backends.reset_caches()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATE_FAST_BACKEND", backend)
        g, z = mlp_guidance(x, weights, biases, "silu", distance_weight=0.3, **kw)
    backends.reset_caches()
    g_true, z_true = autograd_truth(x, weights, biases, "silu", distance_weight=0.3, **kw)
    assert _rel(g, g_true) < tol
    assert _rel(z, z_true) < tol
    if mask_kind != "none":  # masked action dims get no guidance
        m = kw["mask"] if kw["mask"].dim() == 2 else kw["mask"].expand(batch, dim)
        assert (g.masked_select((m == 0)[:, None, :].expand_as(g)) == 0).all()


def _accumulates_in_float32(dtype, device, batch, hidden, dz):
    """The fused gradient's error vs float64 ≤ 2× the error of the same math done by
    autograd in ``dtype`` (GELU encoder 1600 → hidden → 2·dz, a target per sample)."""
    weights, biases = make_encoder(50 * 32, hidden, dz, dtype, device)
    x = torch.randn(batch, 50, 32, dtype=dtype, device=device)
    target = torch.randn(batch, dz, dtype=dtype, device=device)
    g_true, _ = autograd_truth(x, weights, biases, "gelu", target=target, distance_weight=1 / dz)
    g, _ = mlp_guidance(x, weights, biases, "gelu", target=target, distance_weight=1 / dz)
    # the same computation by autograd in the low precision
    xx = x.clone().requires_grad_(True)
    h = xx.reshape(batch, -1)
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w, b)
        if i < len(weights) - 1:
            h = F.gelu(h)
    y = -((h.chunk(2, dim=1)[0] - target) ** 2).sum() / dz
    (g_low,) = torch.autograd.grad(y, xx)
    assert _rel(g, g_true) <= 2 * _rel(g_low, g_true)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_weights_accumulate_in_float32(dtype):
    _accumulates_in_float32(dtype, "cuda", batch=4, hidden=(256, 256), dz=32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture(monkeypatch, backend):
    """Each GPU backend replays from a CUDA graph with the inputs changed in place."""
    monkeypatch.setenv("ATE_FAST_BACKEND", backend)
    backends.reset_caches()
    weights, biases = make_encoder(50 * 32, (128, 128), 16, torch.float32, "cuda")
    x = torch.randn(2, 50, 32, device="cuda")
    target = torch.randn(16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mlp_guidance(x, weights, biases, "gelu", target=target, distance_weight=1 / 16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g, _ = mlp_guidance(x, weights, biases, "gelu", target=target, distance_weight=1 / 16)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    g_true, _ = autograd_truth(x, weights, biases, "gelu", target=target, distance_weight=1 / 16)
    assert _rel(g, g_true) < 2e-5
    assert selected_backend(x) == backend
    backends.reset_caches()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 9])  # one row chunk; two, the second partial
def test_cuda_unroll_16_is_bit_equal_to_4(monkeypatch, dtype, batch):
    """``ATE_FAST_MLP_GUIDANCE_UNROLL=16`` (four times the weight loads in flight per
    thread) adds the same products in the same order as the measured 4: g and z bit-equal,
    with a mask, a0 and eps (every phase of the kernel), the default encoder's sizes."""
    monkeypatch.setenv("ATE_FAST_BACKEND", "cuda")
    backends.reset_caches()
    weights, biases = make_encoder(50 * 32, (512, 512), 64, dtype, "cuda")
    x = torch.randn(batch, 50, 32, device="cuda").to(dtype)
    a0 = torch.randn(batch, 50, 32, device="cuda").to(dtype)
    mask = (torch.rand(32, device="cuda") > 0.2).to(dtype)
    eps = torch.randn(batch, 64, device="cuda").to(dtype)
    kw = dict(a0=a0, mask=mask, eps=eps, distance_weight=1 / 64)
    results = {}
    for unroll in ("4", "16"):
        monkeypatch.setenv("ATE_FAST_MLP_GUIDANCE_UNROLL", unroll)
        results[unroll] = mlp_guidance(x, weights, biases, "gelu", **kw)
    backends.reset_caches()
    assert torch.equal(results["4"][0], results["16"][0])
    assert torch.equal(results["4"][1], results["16"][1])
    g_true, _ = autograd_truth(x, weights, biases, "gelu", **kw)
    assert _rel(results["16"][0], g_true) < {torch.float64: 1e-12, torch.float32: 2e-5}.get(
        dtype, 2e-2
    )


def test_cuda_unroll_setting_is_checked(monkeypatch):
    """The unroll setting is read per call (4 unset, or 16) and anything else raises naming
    the variable; the native launcher itself refuses another depth before it touches a
    device (so this runs without a GPU wherever the CUDA module was built)."""
    from ate_fast import native
    from ate_fast.errors import InvalidArgumentError
    from ate_fast.ops.mlp_guidance import dispatch

    monkeypatch.delenv(dispatch.UNROLL_VAR, raising=False)
    assert dispatch.cuda_unroll() == 4
    monkeypatch.setenv(dispatch.UNROLL_VAR, " 16 ")
    assert dispatch.cuda_unroll() == 16
    monkeypatch.setenv(dispatch.UNROLL_VAR, "8")
    with pytest.raises(InvalidArgumentError, match=r"ATE_FAST_MLP_GUIDANCE_UNROLL.*'8'"):
        dispatch.cuda_unroll()
    if native.build_info().get("cuda_built"):  # built wherever nvcc was (CI: always)
        args = (0, 1, [4, 2], [0], [0], 0, 0, 0, 0, 0, 0, 0, 1, 0, 1.0, 0, 0, 0, 0, 0, 0)
        with pytest.raises(ValueError, match="unroll must be 4 or 16, got 8"):
            native.load("_C_cuda").mlp_guidance(*args, unroll=8)


def test_reference_is_a_decomposition_without_autograd():
    weights, biases = make_encoder(12, (8,), 3, torch.float64, "cpu")
    weights = [w.requires_grad_(True) for w in weights]
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    g, _ = mlp_guidance_reference(
        x, weights, biases, "tanh", target=torch.zeros(3, dtype=torch.float64)
    )
    g_true, _ = autograd_truth(x, weights, biases, "tanh", target=torch.zeros(3))
    assert _rel(g.detach(), g_true) < 1e-12


def test_opcheck():
    weights, biases = make_encoder(24, (16,), 4, torch.float32, "cpu")
    x = torch.randn(3, 6, 4)
    args = (x, weights, biases, 0, torch.randn(4), None, None, None, 0.25)
    torch.library.opcheck(torch.ops.ate_fast.mlp_guidance.default, args)


def test_torch_compile_keeps_the_op():
    weights, biases = make_encoder(24, (16,), 4, torch.float32, "cpu")
    x, target = torch.randn(3, 6, 4), torch.randn(4)

    def step(x):
        g, _ = mlp_guidance(x, weights, biases, "gelu", target=target, distance_weight=0.25)
        return x + 0.1 * g

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))


class _PlainEncoder(nn.Module):
    """The ate_fast.align MLP encoder contract: ``layers`` + ``activation``."""

    def __init__(self, activation="gelu"):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(12, 8), nn.Linear(8, 6)])
        self.activation = activation


def test_encoder_parts_recognises_the_contract():
    enc = _PlainEncoder()
    weights, _, act = mlp_encoder_parts(enc)
    assert act == "gelu" and len(weights) == 2 and weights[0] is enc.layers[0].weight

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _PlainEncoder("relu")

    assert mlp_encoder_parts(Wrapper())[2] == "relu"
    assert mlp_encoder_parts(_PlainEncoder("softplus")) is None
    odd = _PlainEncoder()
    odd.layers[1] = nn.Linear(8, 5)
    assert mlp_encoder_parts(odd) is None  # 5 is not 2·d_z
    seq = _PlainEncoder()
    seq.layers[0] = nn.Sequential(nn.Linear(12, 8))
    assert mlp_encoder_parts(seq) is None


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        (dict(x=torch.randn(2, 24)), ValueError, r"x must be \[B, H, D\]"),
        (dict(target=torch.randn(5)), ValueError, r"target must be \[d_z\] = \[4\]"),
        (dict(target=None), ValueError, "exactly one of target"),
        (dict(a0=torch.randn(2, 6, 4)), ValueError, "exactly one of target"),
        (dict(mask=torch.ones(3)), ValueError, r"mask must be \[D\] = \[4\]"),
        (dict(eps=torch.randn(2, 3)), ValueError, r"eps must be \[B, d_z\]"),
        (dict(distance_weight=float("nan")), ValueError, "distance_weight must be finite"),
        (dict(activation="softplus"), ValueError, "activation must be one of"),
        (dict(target=torch.randn(4, dtype=torch.float64)), TypeError, "target must have x's dtype"),
    ],
)
def test_bad_input(change, error, pattern):
    weights, biases = make_encoder(24, (16,), 4, torch.float32, "cpu")
    kw = dict(
        x=torch.randn(2, 6, 4), target=torch.randn(4), distance_weight=0.25, activation="gelu"
    )
    kw.update(change)
    x = kw.pop("x")
    activation = kw.pop("activation")
    with pytest.raises(error, match=pattern):
        mlp_guidance(x, weights, biases, activation, **kw)


def test_bad_layer_chain():
    weights, biases = make_encoder(24, (16,), 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[out, 16\]"):
        mlp_guidance(torch.randn(2, 6, 4), [weights[0], weights[1][:, :8].contiguous()], biases,
                     target=torch.randn(4))  # fmt: skip


def test_auto_selection_leaves_large_batches_to_gemm():
    from ate_fast.ops.mlp_guidance import FUSED_MAX_BATCH, selected_backend

    backends.reset_caches()
    assert selected_backend(torch.empty(FUSED_MAX_BATCH, 2, 2)) == "cpu"
    assert selected_backend(torch.empty(FUSED_MAX_BATCH + 1, 2, 2)) == "ref"
    with pytest.MonkeyPatch.context() as mp:  # a forced backend ignores the threshold
        mp.setenv("ATE_FAST_BACKEND", "cpu")
        assert selected_backend(torch.empty(FUSED_MAX_BATCH + 1, 2, 2)) == "cpu"
    backends.reset_caches()


@pytest.mark.parametrize("batch", [1, 3, 8, 9])  # the kernel's 1-, 4- and 8-row paths
@pytest.mark.parametrize("act", ["gelu", "silu", "relu", "tanh"])
@pytest.mark.parametrize("options", ["target", "mask+eps", "a0+eps"])
def test_cpu_bfloat16_is_the_float32_kernel_rounded_once(batch, act, options):
    """bf16 storage, float32 compute: widening is exact, so the result is the float32
    kernel's on the same (widened) values, rounded once to bf16 — bit for bit."""
    torch.manual_seed(batch)
    bf = torch.bfloat16
    weights, biases = make_encoder(6 * 5, (24, 16), 8, bf, "cpu", bias_last=batch % 2 == 0)
    x = torch.randn(batch, 6, 5, dtype=bf)
    kw = {"target": torch.randn(batch, 8, dtype=bf)}
    if options != "target":
        kw["eps"] = torch.randn(batch, 8, dtype=bf)
    if options == "mask+eps":
        kw["mask"] = (torch.rand(batch, 5) > 0.3).to(bf)
    if options == "a0+eps":
        kw = {"a0": torch.randn_like(x), "eps": kw["eps"]}
    assert selected_backend(x) == "cpu"
    g, z = mlp_guidance(x, weights, biases, act, distance_weight=0.25, **kw)
    wide = {k: v.float() for k, v in kw.items()}
    g32, z32 = mlp_guidance(x.float(), [w.float() for w in weights],
                            [None if b is None else b.float() for b in biases], act,
                            distance_weight=0.25, **wide)  # fmt: skip
    assert g.dtype == z.dtype == bf
    assert torch.equal(g, g32.to(bf)) and torch.equal(z, z32.to(bf))


def test_cpu_bfloat16_accumulates_in_float32():
    """The CPU kernel in bf16 at the default encoder's width (1600-512-512-128)."""
    _accumulates_in_float32(torch.bfloat16, "cpu", batch=2, hidden=(512, 512), dz=64)
