"""The Triton kernels of the Transformer encoder's VJP (``ate_fast.steer.transformer_triton``)
against torch references, and the ``triton`` path of the encoder's guidance gradient against
autograd.

On the CPU the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest); the ``cuda``-marked cases (here: the paper-size encoder in float32 and
bfloat16; ``tests/test_transformer_vjp.py``: a CUDA-graph replay) run them compiled —
they have not run yet: no GPU was available when the kernels were written.

Tolerances: float64 data is computed in float64 (≤ 1e-12 relative, kernels;
1e-10 / 1e-12 like the torch VJP, whole encoder); float32 in float32 (relative error
≤ 1e-5 — float32's rounding over sums of ≤ 1024 terms, no TF32); bfloat16 storage is
compared with the float64 truth at 3e-2 (bf16's 8-bit mantissa), float16 storage at 4e-3
(its 11-bit mantissa: 8× finer), and the bf16 encoder gradient must be no further from the
truth than the torch VJP's in bfloat16 (×1.5 slack).
"""

from __future__ import annotations

import collections
import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ate_fast.align import ActionVAE
from ate_fast.errors import BackendUnavailableError
from ate_fast.ops import backends
from ate_fast.ops.backends import MIN_TRITON
from ate_fast.steer import LatentGuidance, Steer, latent_distance_gradient, transformer_vjp
from ate_fast.steer.encoder import FrozenEncoder
from ate_fast.steer.transformer_vjp import ENV_VAR, selected_path, vjp_function

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _interpreter(request):
    """The CPU cases need the interpreter; the ``cuda`` ones run compiled kernels."""
    if request.node.get_closest_marker("cuda"):
        return
    if not backends.triton_interpret():
        pytest.skip("Triton CPU interpreter is off (TRITON_INTERPRET=0); cuda cases run instead")
    pytest.importorskip("triton", minversion=backends.MIN_TRITON)  # older: refused by design
    ok, why = backends.availability("triton", "cpu")
    assert ok, why


def tt():
    from ate_fast.steer import transformer_triton

    return transformer_triton


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """float64 draws stored in ``dtype`` (the float64 reference reads the same values)."""
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def make_norm(width: int, dtype: torch.dtype) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(width))
        norm.bias.copy_(torch.randn(width))
    return norm.to(dtype)


# --- residual add + LayerNorm --------------------------------------------------------------
NORM_SHAPES = [(2, 50, 512), (3, 7, 64), (1, 1, 64), (2, 5, 1024), (2, 3, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "rows", "width"), NORM_SHAPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_add_norm_and_its_backward(dtype, batch, rows, width, residual):
    norm = make_norm(width, dtype)
    # x a row slice of a longer sequence (batch stride ≠ rows·width), as the last layer's
    x = rand(batch, rows + 2, width, dtype=dtype)[:, :rows]
    r = rand(batch, rows, width, dtype=dtype) if residual else None
    grad, extra = rand(batch, rows, width, dtype=dtype), rand(batch, rows, width, dtype=dtype)

    y, saved = tt().add_norm(x, r, norm)
    dx = tt().norm_backward(grad, extra if residual else None, saved, norm.weight)

    s = (x.double() + (r.double() if residual else 0)).requires_grad_()
    w, b = norm.weight.double(), norm.bias.double()
    y_ref = F.layer_norm(s, (width,), w, b, norm.eps)
    g_ref = grad.double() + (extra.double() if residual else 0)
    (dx_ref,) = torch.autograd.grad(y_ref, s, g_ref)
    assert y.dtype == dtype and dx.dtype == dtype and y.is_contiguous()
    assert rel(y, y_ref) < TOL[dtype]
    assert rel(dx, dx_ref) < TOL[dtype]
    mean, rstd = saved[1].view(batch, rows), saved[2].view(batch, rows)
    assert rel(mean, s.detach().mean(-1)) < TOL[dtype]
    var = s.detach().var(-1, unbiased=False)
    assert rel(rstd, (var + norm.eps).rsqrt()) < TOL[dtype]


# --- bias + activation ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("shape", [(2, 50, 1024), (3, 7, 40), (1, 1, 16)])
def test_bias_act_and_its_backward(dtype, act, shape):
    x, bias, grad = (
        rand(*shape, dtype=dtype),
        rand(shape[-1], dtype=dtype),
        rand(*shape, dtype=dtype),
    )
    code = tt().ACT_GELU if act == "gelu" else tt().ACT_RELU
    pre, y = tt().bias_act(x, bias, code)
    dx = tt().act_backward(grad, pre, code)
    u = (x.double() + bias.double()).requires_grad_()
    y_ref = F.gelu(u) if act == "gelu" else F.relu(u)
    (dx_ref,) = torch.autograd.grad(y_ref, u, grad.double())
    assert pre.dtype == tt().compute_dtype(dtype) and y.dtype == dtype and dx.dtype == dtype
    assert rel(pre, u.detach()) < TOL[dtype]
    assert rel(y, y_ref) < TOL[dtype]
    assert rel(dx, dx_ref) < TOL[dtype]


# --- attention -----------------------------------------------------------------------------
def attention_reference(q, k, v, heads):
    """softmax(QKᵀ/√hd)V per head, heads merged: [B, Tq, d] from [B, Tq|T, d]."""

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    hd = q.shape[-1] // heads
    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (p @ split(v)).transpose(1, 2).reshape(q.shape)


ATTENTION_SHAPES = [  # batch, tokens, queries (None: all, from one [B, T, 3d]), d, heads
    pytest.param(2, 52, None, 512, 4, id="T52-d512"),
    pytest.param(1, 128, None, 64, 4, id="T128-d64"),
    pytest.param(3, 50, None, 64, 4, id="T50-d64"),
    pytest.param(2, 7, None, 48, 4, id="T7-hd12"),
    pytest.param(2, 1, None, 64, 2, id="T1"),
    pytest.param(2, 50, 1, 512, 4, id="last-layer-1-query"),
    pytest.param(3, 18, 2, 64, 4, id="last-layer-2-queries"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "tokens", "queries", "width", "heads"), ATTENTION_SHAPES)
def test_attention_and_its_backward(dtype, batch, tokens, queries, width, heads):
    if queries is None:  # the encoder's full layer: q, k, v slices of one projection
        qkv = rand(batch, tokens, 3 * width, dtype=dtype)
        q, k, v = qkv.split(width, dim=-1)
    else:  # its last layer: the queries apart, k and v slices of one [B, T, 2d]
        q = rand(batch, queries, width, dtype=dtype)
        k, v = rand(batch, tokens, 2 * width, dtype=dtype).split(width, dim=-1)
    grad = rand(*q.shape, dtype=dtype)

    o, saved = tt().attention(q, k, v, heads)
    dq = torch.full(q.shape, float("nan"), dtype=dtype)  # NaN-poisoned: all must be written
    dkv = torch.full((batch, tokens, 2 * width), float("nan"), dtype=dtype)
    dk, dv = dkv.split(width, dim=-1)
    tt().attention_backward(grad, saved, dq, dk, dv)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref = attention_reference(*leaves, heads)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, leaves, grad.double())
    assert o.dtype == dtype and o.shape == q.shape
    assert rel(o, o_ref) < TOL[dtype]
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert not got.isnan().any()
        if want.abs().max() == 0:  # one key: softmax is constant, dQ = dK = 0 exactly;
            # the kernel's rowsum(dO ⊙ O) leaves rounding noise, measured against dV's size
            assert (got.double() - want).norm() < TOL[dtype] * dv_ref.norm()
        else:
            assert rel(got, want) < TOL[dtype]


def test_attention_past_128_tokens():
    """Blocks of queries and keys (no token limit): 150 tokens (10 query blocks of 16 in
    float32, 5 of 32 in bf16; 10 key blocks, the last one partial) against the reference."""
    test_attention_and_its_backward(torch.float32, 1, 150, None, 32, 2)
    test_attention_and_its_backward(torch.bfloat16, 1, 150, 3, 32, 2)


@pytest.mark.parametrize("name", ["f64x64", "f64x64_b32x64"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_the_benchmarked_tiles(monkeypatch, dtype, name):
    """The attention tiles bench_transformer_guidance.py times (CANDIDATE_TILES: every key
    of a 52-token layer in one chunk), put in the tables for bf16 and float64 alike, against
    the reference at the paper's layer and past one chunk (70 tokens)."""
    tiles = tt().CANDIDATE_TILES[name]
    for which, tile in tiles.items():
        for size in (2, 8):
            monkeypatch.setitem(tt().TILES[which], size, tile)
    constants = tt().attention_constants(52, 52, 128, dtype, backward="backward" in tiles)
    assert (constants["BLOCK_Q"], constants["BLOCK_K"]) == tiles.get("backward", (64, 64))
    test_attention_and_its_backward(dtype, 2, 52, None, 512, 4)
    test_attention_and_its_backward(dtype, 1, 70, 3, 64, 2)


def test_a_long_chunk_takes_the_triton_path(monkeypatch):
    """H + 2 = 131 tokens through the whole encoder (the kernels used to stop at 128)."""
    encoder = FrozenEncoder(make_vae(horizon=129, dim=2, latent=8, layers=1))
    x, target = torch.randn(1, 129, 2, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    got = gradient("triton", monkeypatch, encoder, x, target)
    expected = gradient("autograd", monkeypatch, encoder, x, target)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# --- the whole encoder ---------------------------------------------------------------------
def make_vae(
    horizon=6, dim=3, latent=16, layers=3, activation="gelu", d_model=32, seed=0, ff_dim=40
):
    torch.manual_seed(seed)
    vae = ActionVAE(
        dim, horizon, latent_dim=latent, arch="transformer", d_model=d_model, num_heads=4,
        ff_dim=ff_dim, num_layers=layers, activation=activation,
    )  # fmt: skip
    with torch.no_grad():  # learned tokens and positions well away from init
        for p in vae.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.double()


def gradient(path, monkeypatch, encoder, x, target, **kwargs):
    monkeypatch.setenv(ENV_VAR, path)
    return latent_distance_gradient(encoder, x, target, **kwargs)


ENCODER_CASES = [  # horizon, dim, latent (d_model: identity heads), layers, activation, d_model
    pytest.param(6, 3, 16, 3, "gelu", 32, id="H6-D3-heads-3layers"),
    pytest.param(5, 4, 64, 5, "gelu", 64, id="identity-heads-5layers-d64"),
    pytest.param(4, 2, 8, 1, "relu", 32, id="one-layer-relu"),
]
# every latent mode and reduction on the cases above; the 50-token encoder (attention past
# 32 tokens: the tiles' masked tail), 12 s per run in the interpreter, with one of them (the
# modes and reductions only seed the gradient, the same on every encoder size)
MODES = [(mode, red) for red in ("sample", "batch") for mode in ("mean", "sample")]
ENCODER_RUNS = [
    pytest.param(*case.values, mode, red, id=f"{red}-{mode}-{case.id}")
    for case in ENCODER_CASES
    for mode, red in MODES
] + [pytest.param(48, 3, 12, 3, "gelu", 64, "sample", "batch", id="batch-sample-H48-50-tokens")]


@pytest.mark.parametrize(
    ("horizon", "dim", "latent", "layers", "activation", "d_model", "latent_mode", "reduction"),
    ENCODER_RUNS,
)
def test_triton_path_equals_autograd_in_float64(
    monkeypatch, horizon, dim, latent, layers, activation, d_model, latent_mode, reduction
):
    vae = make_vae(horizon, dim, latent, layers, activation, d_model)
    encoder = FrozenEncoder(vae)
    x = torch.randn(3, horizon, dim, dtype=torch.float64)
    target = torch.randn(3, latent, dtype=torch.float64)
    eps = torch.randn(3, latent, dtype=torch.float64) if latent_mode == "sample" else None
    kwargs = dict(latent=latent_mode, eps=eps, reduction=reduction)
    expected = gradient("autograd", monkeypatch, encoder, x, target, **kwargs)
    got = gradient("triton", monkeypatch, encoder, x, target, **kwargs)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_path_in_float32_and_bfloat16(monkeypatch, dtype):
    """float32 / bfloat16 weights (bf16: the mixed-precision path, float32 samples cast to
    the encoder's dtype) against the float64 autograd truth."""
    vae64 = make_vae(horizon=8, dim=3, latent=16, layers=3, d_model=64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    x = torch.randn(4, 8, 3, dtype=torch.float64)
    target, eps = torch.randn(16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    kwargs = dict(latent="sample", eps=eps)
    truth = gradient("autograd", monkeypatch, FrozenEncoder(vae64, mask=mask), x, target, **kwargs)
    low = FrozenEncoder(make_vae(horizon=8, dim=3, latent=16, layers=3, d_model=64).to(dtype),
                        mask=mask)  # fmt: skip
    x32, kw32 = x.float(), dict(latent="sample", eps=eps.float())
    got = gradient("triton", monkeypatch, low, x32, target.float(), **kw32)
    torch_vjp = gradient("vjp", monkeypatch, low, x32, target.float(), **kw32)
    assert got.dtype == torch.float32 and got[..., 1].abs().max() == 0  # masked dim
    assert rel(got, truth) < TOL[dtype]
    if dtype == torch.bfloat16:  # as close to the truth as the torch VJP in bf16
        assert rel(got, truth) < 1.5 * rel(torch_vjp, truth)


@pytest.mark.parametrize("latent_mode", ["mean", "sample"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_the_few_row_gemm_takes_the_layers_projections(monkeypatch, latent_mode, activation):
    """``ATE_FAST_SKINNY_GEMM=triton`` at B = 1 (8 tokens; widths multiples of 16): every
    layer's projections forward (the last layer's q and k|v apart), the skip projection's
    and the heads', and their products with a weight backward run on the few-row kernel —
    x·Wᵀ and x·W — linear1 with its bias and activation, and ·W2 with the activation's
    derivative, in the kernel's epilogue (no element-wise activation kernel runs), and the
    gradient is autograd's in float64."""
    from ate_fast.models import skinny_gemm

    layers = 3
    vae = make_vae(horizon=6, dim=3, latent=16, layers=layers, activation=activation,
                   d_model=32, ff_dim=48)  # fmt: skip
    encoder = FrozenEncoder(vae)
    x, target = torch.randn(1, 6, 3, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    eps = torch.randn(1, 16, dtype=torch.float64) if latent_mode == "sample" else None
    kwargs = dict(latent=latent_mode, eps=eps)
    expected = gradient("autograd", monkeypatch, encoder, x, target, **kwargs)
    monkeypatch.setenv(skinny_gemm.ENV_VAR, "triton")
    names = ("skinny_linear", "skinny_matmul", "skinny_linear_act", "skinny_matmul_act_grad")
    with contextlib.ExitStack() as stack:
        spies = [stack.enter_context(mock.patch.object(skinny_gemm, name,
                                                       wraps=getattr(skinny_gemm, name)))
                 for name in names]  # fmt: skip
        for name in ("bias_act", "act_backward"):  # the element-wise kernels: not launched
            stack.enter_context(mock.patch.object(tt(), name, side_effect=AssertionError(name)))
        got = gradient("triton", monkeypatch, encoder, x, target, **kwargs)
    # three projections a layer (the last layer's q and k|v apart), the skip projection
    # (3 layers: one) and the latent's heads (μ; and log σ²); the input projection's K = 3
    # is no multiple of 16, so torch's GEMM takes it
    others = 1 + (2 if latent_mode == "sample" else 1)
    projections = 3 * (layers - 1) + 4 + others
    assert [spy.call_count for spy in spies] == [projections, projections, layers, layers]
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _encoder_kernels(monkeypatch, layers: int) -> tuple[collections.Counter, ...]:
    """``(ATen compute ops, Triton launches)`` of one guidance gradient through a bf16
    encoder of ``layers`` layers at B = 1 (8 tokens; every width a multiple of 16) with the
    layers' matmuls on the few-row GEMM (``ATE_FAST_SKINNY_GEMM=triton``)."""
    from flow_head_paths import interpreted_launches  # tests/ is on sys.path
    from test_flow_transformer_kernels import _Count

    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM", "triton")
    torch.manual_seed(0)
    vae = ActionVAE(16, 6, latent_dim=32, arch="transformer", d_model=32, num_heads=2,
                    ff_dim=64, num_layers=layers).to(torch.bfloat16)  # fmt: skip
    encoder = transformer_vjp.align_transformer_encoder(vae)
    x, target = torch.randn(1, 6, 16).bfloat16(), torch.randn(32).bfloat16()
    with torch.no_grad(), interpreted_launches() as launches, _Count() as count:
        transformer_vjp.transformer_latent_gradient(encoder, x, target, kernels="triton")
    allocations = {"new_empty", "empty_like", "empty", "new_empty_strided"}
    ops = collections.Counter({k: n for k, n in count.ops.items() if k not in allocations})
    return ops, launches


def test_an_encoder_layer_is_fourteen_launches(monkeypatch):
    """Each encoder layer's forward and input-VJP, all on Triton, is 14 launches: 4
    few-row GEMMs each way (linear1 with its bias and GELU, ·W2 with GELU's derivative in
    the GEMMs' epilogues), the attention and its backward, 2 add + norm and 2 norm
    backward — counted as the difference of a 5- and a 3-layer encoder (two layers and one
    skip connection: its GEMM each way and its concatenation). The 3-layer gradient's other
    work: the input projection each way, and 6 ATen kernels (the tokens' and the skip's
    concatenations, the positions' add, the latent's distance gradient — 2, straight into
    the μ row's gradient: no zeroed buffer, no copy — and the last layer's row update, in
    place)."""
    pytest.importorskip("triton", minversion=MIN_TRITON)
    ops3, launches3 = _encoder_kernels(monkeypatch, 3)
    ops5, launches5 = _encoder_kernels(monkeypatch, 5)
    per_layer = {"_skinny_gemm_kernel": 8, "_attention_kernel": 1,
                 "_attention_backward_kernel": 1, "_add_norm_kernel": 2,
                 "_norm_backward_kernel": 2}  # fmt: skip
    assert sum(per_layer.values()) == 14
    skip = collections.Counter({"_skinny_gemm_kernel": 2})
    two_layers = collections.Counter({k: 2 * n for k, n in per_layer.items()})
    assert launches5 - launches3 == two_layers + skip
    assert ops5 - ops3 == collections.Counter({"cat": 1})
    # 3 layers + the skip + the input projection each way + the final norm each way
    fixed = collections.Counter({"_skinny_gemm_kernel": 2, "_add_norm_kernel": 1,
                                 "_norm_backward_kernel": 1})  # fmt: skip
    layers3 = collections.Counter({k: 3 * n for k, n in per_layer.items()})
    layers3["_skinny_gemm_kernel"] += 2  # the last layer's q and k|v apart, each way
    assert launches3 == layers3 + skip + fixed
    assert sum(ops3.values()) == 6, dict(ops3)


def test_public_entry_points_take_the_triton_path(monkeypatch):
    """Steer and LatentGuidance (in inference mode, as the samplers call it) through the
    triton path give the autograd result, and the Triton kernels are what ran."""
    vae = make_vae()
    x, a0 = torch.randn(3, 6, 3, dtype=torch.float64), torch.randn(3, 6, 3, dtype=torch.float64)
    steer = Steer(vae)
    guidance = LatentGuidance(vae, torch.randn(16, dtype=torch.float64), mode="direct")
    calls = []
    attention = tt().attention

    def spy(*args):
        calls.append(1)
        return attention(*args)

    results = {}
    for path in ("autograd", "triton"):
        monkeypatch.setenv(ENV_VAR, path)
        monkeypatch.setattr(tt(), "attention", spy)
        with torch.inference_mode():
            g_infer = guidance.gradient(x, x, torch.ones(3, dtype=torch.float64))
        results[path] = (steer.guidance(x, a0), g_infer)
    assert len(calls) == 2 * 3  # two calls, three layers each
    for got, expected in zip(results["triton"], results["autograd"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_the_batch_of_one_default_reaches_the_kernels(monkeypatch):
    """The guidance passes its batch size to the selection: with a device's single-sample
    default set to triton (here the CPU's, whose interpreter is on), a B = 1 gradient runs
    the Triton kernels and a B = 2 one the torch VJP, both equal to autograd's."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setitem(transformer_vjp.SINGLE_SAMPLE_PATH, "cpu", "triton")
    vae = make_vae()
    guidance = LatentGuidance(vae, torch.randn(16, dtype=torch.float64), mode="direct")
    calls = []
    attention = tt().attention
    monkeypatch.setattr(tt(), "attention", lambda *a: calls.append(1) or attention(*a))
    for batch, layers_run in ((1, 3), (2, 0)):
        calls.clear()
        x = torch.randn(batch, 6, 3, dtype=torch.float64)
        with torch.inference_mode():
            got = guidance.gradient(x, x, torch.ones(batch, dtype=torch.float64))
        assert len(calls) == layers_run, batch
        with monkeypatch.context() as m:
            m.setenv(ENV_VAR, "autograd")
            want = guidance.gradient(x, x, torch.ones(batch, dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_selection(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert selected_path("cuda") == "vjp" and selected_path("cpu") == "vjp"
    # a batch of one on CUDA: the Triton kernels where Triton runs there (measured faster
    # on an H200 at B = 1, slower at B = 8); the CPU keeps the VJP
    with monkeypatch.context() as m:
        m.setattr(backends, "availability", lambda *_: (True, ""))
        assert selected_path("cuda", 1) == "triton" and selected_path("cuda", 8) == "vjp"
        # bf16 / fp16 up to B = 8 (measured 1.79x at B = 8 in bf16); float32 only at B = 1
        for dtype in (torch.bfloat16, torch.float16):
            assert selected_path("cuda", 8, dtype) == "triton"
            assert selected_path("cuda", 9, dtype) == "vjp"
        assert selected_path("cuda", 2, torch.float32) == "vjp"
        assert selected_path("cpu", 2, torch.bfloat16) == "vjp"
        assert vjp_function("cuda", 1).keywords == {"kernels": "triton"}
        assert selected_path("cpu", 1) == "vjp"
        m.setattr(backends, "availability", lambda *_: (False, "no Triton"))
        assert selected_path("cuda", 1) == "vjp"  # a default falls back without an error
    monkeypatch.setenv(ENV_VAR, "triton")
    assert selected_path("cuda") == "triton"
    fn = vjp_function("cpu")  # the interpreter is on (conftest)
    assert fn.keywords == {"kernels": "triton"}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.reset_caches()
    try:
        with pytest.raises(BackendUnavailableError, match=f"{ENV_VAR}=triton is unavailable"):
            vjp_function("cpu")
    finally:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        backends.reset_caches()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 8])
def test_paper_size_encoder_on_cuda(monkeypatch, no_tf32, dtype, batch):
    """The paper's encoder (d_model 512, 4 heads of 128, ff 1024, 9 layers) at H = 50
    (52 tokens) on the GPU: the triton path against the float64 autograd truth, as close
    as the torch VJP in the same dtype (×1.5 slack)."""
    _check_paper_size_encoder(monkeypatch, dtype, batch)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["f64x64", "f64x64_b32x64"])
def test_the_benchmarked_tiles_on_cuda(monkeypatch, no_tf32, name):
    """bench_transformer_guidance's bf16 tile rows, compiled for the GPU: the paper's
    encoder at B = 1 and 8, as close to the truth as at the default tiles' bound."""
    for which, tile in tt().CANDIDATE_TILES[name].items():
        monkeypatch.setitem(tt().TILES[which], 2, tile)
    for batch in (1, 8):
        _check_paper_size_encoder(monkeypatch, torch.bfloat16, batch)


def _check_paper_size_encoder(monkeypatch, dtype: torch.dtype, batch: int) -> None:
    torch.manual_seed(0)
    vae = ActionVAE(32, 50, latent_dim=512, arch="transformer").cuda()
    x = torch.randn(batch, 50, 32, device="cuda")
    target, eps = torch.randn(512, device="cuda"), torch.randn(batch, 512, device="cuda")
    kwargs = dict(latent="sample", eps=eps)
    truth = gradient("autograd", monkeypatch, FrozenEncoder(vae.double()), x.double(),
                     target.double(), latent="sample", eps=eps.double())  # fmt: skip
    low = FrozenEncoder(vae.to(dtype))
    got = gradient("triton", monkeypatch, low, x, target, **kwargs)
    torch_vjp = gradient("vjp", monkeypatch, low, x, target, **kwargs)
    assert got.dtype == torch.float32 and got.is_cuda
    assert rel(got, truth) < (1e-4 if dtype == torch.float32 else TOL[dtype])
    assert rel(got, truth) < 1.5 * rel(torch_vjp, truth) + 1e-6
