"""Triton backend of the fused MLP-encoder guidance against the PyTorch reference.

On the CPU the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``, set
by conftest); the ``cuda``-marked cases run them compiled on a GPU. Shapes are small so
that the interpreter keeps the file fast, but cover one and several row blocks
(``BLOCK_B`` 16/32, and twice the rows with ``a0``), feature counts that are not tile
multiples, several K-steps (input wider than 64) and depth 1..4.
"""

from __future__ import annotations

import pytest
import torch

from ate_fast.ops import backends, mlp_guidance_reference
from ate_fast.ops.constants import ACTIVATIONS
from ate_fast.ops.mlp_guidance import mlp_guidance
from ate_fast.ops.mlp_guidance.dispatch import IMPLEMENTATIONS, mlp_guidance_into, selected_backend

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [
    pytest.param("cpu", torch.float64, id="cpu-f64"),
    pytest.param("cpu", torch.float32, id="cpu-f32"),
    pytest.param("cuda", torch.float64, id="cuda-f64", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float32, id="cuda-f32", marks=pytest.mark.cuda),
]
# (B, H, D, hidden widths, d_z)
SHAPES = [
    pytest.param(1, 4, 3, (), 2, id="B1-depth1"),
    pytest.param(3, 5, 7, (37,), 4, id="B3-h37"),
    pytest.param(2, 20, 7, (70,), 17, id="B2-wide-in140-dz17"),
    pytest.param(20, 4, 5, (37, 16), 3, id="B20-depth3"),
    pytest.param(40, 3, 3, (24, 37, 9), 5, id="B40-depth4"),
]


def make_encoder(features, hidden, dz, dtype, device):
    dims = [features, *hidden, 2 * dz]
    weights = [(torch.randn(o, i, dtype=torch.float64) / i**0.5).to(dtype).to(device)
               for i, o in zip(dims[:-1], dims[1:])]  # fmt: skip
    biases = [torch.randn(o, dtype=torch.float64).to(dtype).to(device) for o in dims[1:]]
    return weights, biases


@pytest.fixture(autouse=True)
def _fresh_selection():
    backends.reset_caches()
    yield
    backends.reset_caches()


def _require(device: str) -> None:
    if device == "cpu" and not backends.triton_interpret():
        pytest.skip("Triton CPU interpreter is off (TRITON_INTERPRET=0); cuda cases run instead")
    pytest.importorskip("triton", minversion=backends.MIN_TRITON)  # older: refused by design
    ok, why = backends.availability("triton", device)
    assert ok, f"triton backend should be available on {device}: {why}"


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _reference(x, weights, biases, act, target, a0, mask, eps, distance_weight):
    # in float64 on the CPU: the truth for every dtype
    def up(t):
        return None if t is None else t.double().cpu()

    return mlp_guidance_reference(
        up(x), [up(w) for w in weights], [up(b) for b in biases], act,
        up(target), up(a0), up(mask), up(eps), distance_weight,
    )  # fmt: skip


def _run(x, weights, biases, act, target=None, a0=None, mask=None, eps=None, distance_weight=1.0):
    """The triton backend into NaN-poisoned outputs (every element must be written)."""
    g = torch.full_like(x, float("nan"))
    z = torch.full((x.shape[0], weights[-1].shape[0] // 2), float("nan"), dtype=x.dtype,
                   device=x.device)  # fmt: skip
    mlp_guidance_into(g, z, x, weights, biases, ACTIVATIONS.index(act), target, a0, mask, eps,
                      distance_weight, backend="triton")  # fmt: skip
    assert not g.isnan().any() and not z.isnan().any(), "unwritten output elements"
    return g, z


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize(("batch", "horizon", "dim", "hidden", "dz"), SHAPES)
def test_matches_reference(device, dtype, act, batch, horizon, dim, hidden, dz):
    _require(device)
    weights, biases = make_encoder(horizon * dim, hidden, dz, dtype, device)
    x = torch.randn(batch, horizon, dim, dtype=dtype, device=device)
    target = torch.randn(batch, dz, dtype=dtype, device=device)
    g, z = _run(x, weights, biases, act, target=target, distance_weight=1.0 / dz)
    g_ref, z_ref = _reference(x, weights, biases, act, target, None, None, None, 1.0 / dz)
    assert _rel(g, g_ref) < TOL[dtype]
    assert _rel(z, z_ref) < TOL[dtype]


@pytest.mark.parametrize(("device", "dtype"), DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "shared", "per-sample"])
@pytest.mark.parametrize("target_kind", ["latent", "batch", "a0"])
@pytest.mark.parametrize("with_eps", [False, True], ids=["mean", "sample"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_options(device, dtype, mask_kind, target_kind, with_eps, bias):
    _require(device)
    batch, horizon, dim, dz = 18, 5, 6, 7  # 18 rows: two row blocks of 16 (36 with a0)
    weights, biases = make_encoder(horizon * dim, (37, 16), dz, dtype, device)
    if not bias:
        biases = [None] * len(weights)
    x = torch.randn(batch, horizon, dim, dtype=dtype, device=device)
    kw = dict(target=None, a0=None, mask=None, eps=None)
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
    g, z = _run(x, weights, biases, "gelu", distance_weight=0.3, **kw)
    g_ref, z_ref = _reference(x, weights, biases, "gelu", distance_weight=0.3, **kw)
    assert _rel(g, g_ref) < TOL[dtype]
    assert _rel(z, z_ref) < TOL[dtype]
    if mask_kind != "none":  # masked action dims get no guidance
        m = kw["mask"] if kw["mask"].dim() == 2 else kw["mask"].expand(batch, dim)
        assert (g.masked_select((m == 0)[:, None, :].expand_as(g)) == 0).all()


@pytest.mark.parametrize("distance_weight", [1 / 3, 0.1, -2.5, 0.0, 1e-100, 1e100])
def test_distance_weight_reaches_the_kernel_in_float64(distance_weight):
    """Triton would pass a Python float as float32; the 64-bit pattern keeps it exact."""
    _require("cpu")
    weights, biases = make_encoder(12, (9,), 3, torch.float64, "cpu")
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    target = torch.randn(3, dtype=torch.float64)
    g, _ = _run(x, weights, biases, "tanh", target=target, distance_weight=distance_weight)
    g_ref, _ = _reference(x, weights, biases, "tanh", target, None, None, None, distance_weight)
    if distance_weight == 0.0:
        assert (g == 0).all()
    else:
        assert _rel(g, g_ref) < 1e-13


@pytest.mark.parametrize("with_a0", [True, False], ids=["a0", "target"])
def test_latent_kernel_k_steps(with_a0):
    """The latent layer over an input 45 wide: three K-steps of 16 (a0 and eps: the
    latent kernel's narrower step, ``latent_block_k``) or two of 32, the last one partial."""
    _require("cpu")
    from ate_fast.ops.mlp_guidance.triton import latent_block_k

    weights, biases = make_encoder(12, (45,), 5, torch.float64, "cpu")
    x, a0 = torch.randn(2, 3, 4, 3, dtype=torch.float64)  # [B, H, D] each, 12 features
    eps = torch.randn(3, 5, dtype=torch.float64)
    kw = dict(a0=a0) if with_a0 else dict(target=torch.randn(3, 5, dtype=torch.float64))
    assert latent_block_k(with_a0, True) == (16 if with_a0 else 32)
    g, z = _run(x, weights, biases, "gelu", eps=eps, distance_weight=0.7, **kw)
    g_ref, z_ref = _reference(x, weights, biases, "gelu", kw.get("target"), kw.get("a0"), None,
                              eps, 0.7)  # fmt: skip
    assert _rel(g, g_ref) < 1e-12 and _rel(z, z_ref) < 1e-12


def test_sixteen_layers_and_empty_batch():
    _require("cpu")
    weights, biases = make_encoder(6, (9,) * 15, 2, torch.float64, "cpu")
    # gain 1.5 keeps the signal alive through 16 SiLU layers (at 1/√fan_in the gradient
    # fades to ~1e-7 and every backend, C++ included, shows ~1e-12 cancellation error)
    weights = [1.5 * w for w in weights]
    x, a0 = torch.randn(2, 1, 3, 2, dtype=torch.float64)
    eps = torch.randn(1, 2, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g, z = _run(x, weights, biases, "silu", a0=a0, mask=mask, eps=eps, distance_weight=0.5)
    g_ref, z_ref = _reference(x, weights, biases, "silu", None, a0, mask, eps, 0.5)
    assert _rel(g, g_ref) < 1e-12 and _rel(z, z_ref) < 1e-12
    empty = torch.empty(0, 3, 2, dtype=torch.float64)
    g, z = _run(empty, weights, biases, "silu", target=torch.zeros(2, dtype=torch.float64))
    assert g.shape == (0, 3, 2) and z.shape == (0, 2)


def test_parameters_and_the_public_api():
    """Forced through ATE_FAST_BACKEND: weights that require grad, the public call."""
    _require("cpu")
    weights, biases = make_encoder(15, (11, 8), 4, torch.float32, "cpu")
    weights = [torch.nn.Parameter(w) for w in weights]
    x, a0 = torch.randn(3, 5, 3), torch.randn(3, 5, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATE_FAST_BACKEND", "triton")
        assert selected_backend(x) == "triton"
        assert selected_backend(torch.empty(64, 2, 2)) == "triton"  # forced: any batch
        g, z = mlp_guidance(x, weights, biases, "silu", a0=a0, distance_weight=0.25)
    g_ref, z_ref = _reference(x, weights, biases, "silu", None, a0, None, None, 0.25)
    assert _rel(g, g_ref) < 2e-5 and _rel(z, z_ref) < 2e-5
    assert not g.requires_grad


def test_selection():
    assert "triton" in IMPLEMENTATIONS
    # the default CPU choice stays the C++ backend; triton runs on the CPU only when forced
    assert selected_backend(torch.empty(2, 3, 4)) == "cpu"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATE_FAST_BACKEND", "triton")
        with pytest.raises(backends.BackendUnavailableError, match="no triton implementation"):
            selected_backend(torch.empty(2, 3, 4, dtype=torch.float16))  # half: CUDA only
        backends.reset_caches()
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(backends.BackendUnavailableError, match="interpreter"):
            selected_backend(torch.empty(2, 3, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_storage(dtype):
    """float16/bfloat16 weights and data, float32 arithmetic (the cuda backend's contract)."""
    weights, biases = make_encoder(50 * 32, (256, 256), 32, dtype, "cuda")
    x = torch.randn(4, 50, 32, dtype=dtype, device="cuda")
    a0 = torch.randn(4, 50, 32, dtype=dtype, device="cuda")
    eps = torch.randn(4, 32, dtype=dtype, device="cuda")
    g, z = _run(x, weights, biases, "gelu", a0=a0, eps=eps, distance_weight=1 / 32)
    g_ref, z_ref = _reference(x, weights, biases, "gelu", None, a0, None, eps, 1 / 32)
    assert _rel(g, g_ref) < TOL[dtype]
    assert _rel(z, z_ref) < TOL[dtype]


def test_model_level_paths_match_ref():
    """LatentGuidance and Steer over an ActionVAE(arch="mlp"): triton == ref."""
    _require("cpu")
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance, Steer

    horizon, dim, dz, batch = 6, 4, 5, 3
    vae = ActionVAE(dim, horizon, dz, arch="mlp", hidden_dims=(37, 16)).double()
    target = torch.randn(dz, dtype=torch.float64)
    x, a0 = torch.randn(2, batch, horizon, dim, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    guidance = LatentGuidance(vae, target, mode="direct", mask=mask)
    steer = Steer(vae, latent="sample", reduction="batch", mask=mask)
    calls = []

    def spy(*args):
        calls.append(1)
        return triton_impl(*args)

    triton_impl = IMPLEMENTATIONS["triton"]
    results = {}
    for backend in ("ref", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ATE_FAST_BACKEND", backend)
            mp.setitem(IMPLEMENTATIONS, "triton", spy)
            backends.reset_caches()
            ones = torch.ones(batch, dtype=torch.float64)
            g_direct = guidance.gradient(x, x, ones)
            g_steer = steer.guidance(x, a0, torch.Generator().manual_seed(7))
            results[backend] = (g_direct, g_steer)
    assert len(calls) == 2, "the fused triton kernel was not used"
    for got, want in zip(results["triton"], results["ref"]):
        assert got.abs().max() > 0
        assert _rel(got, want) < 1e-12
