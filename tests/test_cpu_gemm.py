"""The heads' float32 GEMMs on oneDNN where MKL runs AVX2 on an AVX-512 CPU
(models/cpu_gemm.py): the choice, the products against float64, where oneDNN takes a GEMM
and where ATen keeps it (autograd, torch.func, graph captures), and the heads on each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_counts import OpCounter  # tests/ is on sys.path
from torch import nn

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import ChunkConv1d, ChunkConvTranspose1d, cpu_gemm, make_head

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def gemm(monkeypatch):
    """Select the GEMM: ``gemm("onednn")`` (resolved at once: the probe's ops stay out of
    the counts)."""

    def select(choice: str) -> None:
        monkeypatch.setenv(cpu_gemm.ENV_VAR, choice)
        if choice.strip().lower() in cpu_gemm.CHOICES:
            cpu_gemm.selected_gemm()

    return select


def _bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A float32 dot product's rounding bound per output: γ_K · (|x| |w|ᵀ), γ_K = K·u/(1−K·u)."""
    k = x.shape[-1]
    u = 2.0**-24
    return k * u / (1 - k * u) * (x.double().abs() @ weight.double().abs().t()) + 1e-30


def test_the_choice_follows_the_variable(gemm):
    gemm("aten")
    assert cpu_gemm.selected_gemm() == "aten"
    gemm(" OneDNN ")
    assert cpu_gemm.selected_gemm() == "onednn"
    gemm("mkl")
    with pytest.raises(InvalidArgumentError, match=r"ATE_FAST_CPU_GEMM.*'auto', 'onednn', 'aten'"):
        cpu_gemm.selected_gemm()


@pytest.mark.parametrize(
    ("vendor", "capability", "onednn"),
    [
        ("AuthenticAMD", "AVX512", True),  # Zen 4 / 5: MKL runs AVX2 there
        ("GenuineIntel", "AVX512", False),  # MKL's own AVX-512 code
        ("AuthenticAMD", "AVX2", False),  # both AVX2
        ("HygonGenuine", "AVX512", True),
        ("", "AVX512", False),  # unknown vendor: ATen as before
    ],
)
def test_auto_selects_onednn_where_mkl_runs_avx2_on_avx512(
    monkeypatch, gemm, vendor, capability, onednn
):
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_gemm.mkl_runs_avx2_on_avx512.__wrapped__() is onednn
    monkeypatch.setattr(cpu_gemm, "mkl_runs_avx2_on_avx512", lambda: onednn)
    cpu_gemm._resolve.cache_clear()
    try:
        gemm("")
        assert cpu_gemm.selected_gemm() == ("onednn" if onednn else "aten")
        gemm("auto")
        assert cpu_gemm.selected_gemm() == ("onednn" if onednn else "aten")
    finally:
        cpu_gemm._resolve.cache_clear()


def test_this_torch_has_the_onednn_linear():
    ok, why = cpu_gemm.onednn_linear_available()
    assert ok, why


ATEN_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "linear", "matmul"}
# (x's shape, N): the heads' shapes (H = 50 rows, U-Net chunk rows) and odd ones
SHAPES = [((50, 256), 2048), ((1, 50, 1024), 256), ((4, 2560), 512), ((2, 7, 300), 1100)]


@pytest.mark.parametrize(("x_shape", "n"), SHAPES)
@pytest.mark.parametrize("form", ["linear", "bias", "transposed", "times_weight", "residual"])
def test_products_are_float64_within_float32_rounding(gemm, x_shape, n, form):
    gemm("onednn")
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*x_shape, generator=gen)
    k = x_shape[-1]
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if form == "bias" else None
    residual = torch.randn(*x_shape[:-1], n, generator=gen) if form == "residual" else None
    if form == "transposed":  # a [K, N] weight's transpose: the input-VJP's operand
        weight = torch.randn(k, n, generator=gen).t() / k**0.5
    with OpCounter() as seen:
        if form == "times_weight":  # x @ W for a [K, N] weight W = weight.t()
            got = cpu_gemm.times_weight(x, weight.t().contiguous())
        elif form == "residual":
            got = cpu_gemm.linear_residual_rows(x, weight, residual)
        else:
            got = cpu_gemm.linear(x, weight, bias)
    assert seen.ops["_linear_pointwise"] == 1 and not ATEN_GEMMS & set(seen.ops), dict(seen.ops)
    want = x.double() @ weight.double().t()
    want = want + (bias.double() if bias is not None else 0)
    want = want + (residual.double() if residual is not None else 0)
    assert got.shape == want.shape and got.dtype == torch.float32
    # the bias / residual add one rounding of the sum's magnitude
    slack = 2.0**-24 * want.abs()
    err = (got.double() - want).abs()
    assert (err <= _bound(x, weight) + slack).all(), float((err - _bound(x, weight)).max())


def test_the_bound_catches_a_bf16_product(gemm):
    """The tolerance above is tight enough to fail a product rounded through bf16."""
    gemm("onednn")
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(50, 256, generator=gen), torch.randn(2048, 256, generator=gen)
    rounded = F.linear(x.bfloat16(), weight.bfloat16()).float()
    err = (rounded.double() - x.double() @ weight.double().t()).abs()
    assert (err > _bound(x, weight) + 2.0**-24 * err.abs()).sum() > 1000


def test_where_onednn_takes_the_gemm(gemm):
    gemm("onednn")
    x, w = torch.randn(50, 256), torch.randn(2048, 256)
    takes = cpu_gemm.onednn_takes
    assert takes(x, w) and takes(x, w.t().contiguous().t())
    assert not takes(x[:, :128], w[:, :128])  # strided operands: ATen (oneDNN's slow path)
    assert not takes(x.t().contiguous().t(), w)
    assert not takes(torch.randn(1, 512), torch.randn(512, 512))  # under MIN_MACS
    assert not takes(x.double(), w.double())
    assert not takes(x.bfloat16(), w.bfloat16())  # ATen runs bf16 on oneDNN already
    assert not takes(x, w, torch.randn(2048, dtype=torch.float64))
    param = nn.Parameter(w)
    assert not takes(x, param)  # autograd records: oneDNN's op has no backward
    with torch.no_grad():
        assert takes(x, param)
    with torch.inference_mode():
        assert takes(x, param)
    gemm("aten")
    assert not takes(x, w)


def test_autograd_and_torch_func_keep_aten(gemm):
    gemm("onednn")
    layer = nn.Linear(256, 2048)
    x = torch.randn(50, 256, requires_grad=True)
    with OpCounter() as seen:
        cpu_gemm.linear_of(layer, x).square().sum().backward()
    assert "_linear_pointwise" not in seen.ops
    want = 2 * (x @ layer.weight.t() + layer.bias) @ layer.weight
    torch.testing.assert_close(x.grad, want.detach(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        xs = torch.randn(3, 50, 256)
        with OpCounter() as seen:
            got = torch.func.vmap(lambda row: cpu_gemm.linear_of(layer, row))(xs)
        assert "_linear_pointwise" not in seen.ops
        torch.testing.assert_close(got, layer(xs))
        _, pullback = torch.func.vjp(lambda v: cpu_gemm.linear(v, layer.weight), xs[0])
        (got,) = pullback(torch.ones(50, 2048))
        torch.testing.assert_close(got, layer.weight.sum(0).expand(50, -1))


def test_forward_mode_ad_keeps_aten(gemm):
    """Dual tensors through frozen weights (forward-mode AD, no requires_grad anywhere):
    oneDNN's op has no forward-AD rule and dropped the tangent (None) without a word."""
    import torch.autograd.forward_ad as fwAD

    gemm("onednn")
    layer = nn.Linear(256, 2048).requires_grad_(False)
    x, v = torch.randn(50, 256), torch.randn(50, 256)
    assert cpu_gemm.onednn_takes(x, layer.weight, layer.bias)
    with fwAD.dual_level():
        assert not cpu_gemm.onednn_takes(x, layer.weight, layer.bias)
        with OpCounter() as seen:
            out = cpu_gemm.linear_of(layer, fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    assert "_linear_pointwise" not in seen.ops
    assert tangent is not None
    torch.testing.assert_close(tangent, v @ layer.weight.t())


class _Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(256, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_gemm.linear_of(self.layer, x)


def test_graph_captures_keep_aten_ops(gemm):
    gemm("onednn")
    module, x = _Projection().eval(), torch.randn(1, 50, 256)
    with torch.no_grad():
        traced = torch.jit.trace(module, (x,))
        exported = torch.export.export(module, (x,), strict=False)
    assert "mkldnn" not in str(traced.graph) and "linear" in str(traced.graph)
    ops = {str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in op for op in ops) and any("linear" in op for op in ops), ops
    graphs = []

    def backend(gm, example_inputs):  # torch.compile: one graph, no break, ATen's linear
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(module, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, module.layer(x))
    assert len(graphs) == 1 and "linear" in graphs[0] and "mkldnn" not in graphs[0]


def test_the_mlp_head_exports_with_a_dynamic_batch(gemm):
    """The MLP head's one-library choice (cpu_gemm.reaches_onednn_size) compares the
    row count with MIN_MACS: under torch.export with a symbolic batch it must not (the
    comparison raised as a guard on the batch), and the program runs at another batch."""
    gemm("onednn")
    head = make_head("mlp", "small").eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    x, t = torch.randn(2, 50, 32), torch.rand(2)
    program = torch.export.export(head, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
    x, t = torch.randn(40, 50, 32), torch.rand(40)
    torch.testing.assert_close(program.module()(x, t), head(x, t), rtol=1e-5, atol=1e-5)


def test_a_wrapped_layer_is_called(gemm):
    """Not a plain nn.Linear: the layer's own forward runs (what it adds is kept)."""
    gemm("onednn")

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer, x = Scaled(256, 2048), torch.randn(50, 256)
    with torch.no_grad():
        want = 2 * F.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(cpu_gemm.linear_of(layer, x), want)


# (kind, config, batch, cond width or None, GEMMs on oneDNN per forward and per pullback)
HEAD_CASES = {
    # 4 blocks x 5 GEMMs + the time MLP's second layer, in the forward and in the pullback
    "flow-transformer-small": ("flow-transformer", "small", 1, 16, 21, 21),
    # none: the body's hidden layer [50, 256] x [256, 256] would take oneDNN, but the first
    # and last ([50, 32] x [32, 256], 0.4 M MACs) stay on ATen, so it does too (one library)
    "mlp-small": ("mlp", "small", 1, None, 0, 0),
    # B = 8, 400 rows: every layer reaches MIN_MACS, so the body's two (the first is the
    # batched GEMM with the folded bias, ATen's baddbmm) and the pullback's three take it
    "mlp-small-b8": ("mlp", "small", 8, None, 2, 3),
    # flatten: [8, 1600] x [1600, 512] with the context as the residual, [8, 512] x
    # [512, 512] and x [512, 1600]; the pullback's three products
    "mlp-flat-b8": ("mlp", "flat", 8, None, 3, 3),
}


def _head_run(gemm, choice: str, case: str):
    """A head's forward, forward_with_vjp and pullback under GEMM ``choice``, and the ops."""
    kind, config, batch, prefix, _, _ = HEAD_CASES[case]
    gemm(choice)
    torch.manual_seed(0)
    head = make_head(kind, config).eval()
    horizon, dim = head.config.horizon, head.config.action_dim
    x, t, u = torch.randn(batch, horizon, dim), torch.rand(batch), torch.randn(batch, horizon, dim)
    cond = (
        None if prefix is None else head.prefix_cache(torch.randn(batch, prefix, head.config.width))
    )
    with torch.no_grad(), OpCounter() as seen:
        out = head(x, t, cond)
        vjp_out, pullback = head.forward_with_vjp(x, t, cond)
        grad = pullback(u)
    return out, vjp_out, grad, seen.ops


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_heads_on_onednn(gemm, case):
    *_, forward_gemms, pullback_gemms = HEAD_CASES[case]
    out, vjp_out, grad, ops = _head_run(gemm, "onednn", case)
    assert ops["_linear_pointwise"] == 2 * forward_gemms + pullback_gemms, dict(ops)
    assert torch.equal(out, vjp_out)  # forward_with_vjp: the forward's ops, bit for bit
    ref_out, _, ref_grad, ref_ops = _head_run(gemm, "aten", case)
    assert "_linear_pointwise" not in ref_ops
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


CHUNK_LAYERS = {
    "conv": (ChunkConv1d(512, 512, 5, padding=2), lambda x, w, b: F.conv1d(x, w, b, padding=2)),
    "transpose": (
        ChunkConvTranspose1d(512, 256, 4, stride=2, padding=1),
        lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2, padding=1),
    ),
}


@pytest.mark.parametrize("kind", list(CHUNK_LAYERS))
def test_chunk_convolutions_on_onednn(gemm, kind):
    """The DP U-Net's chunk rows (C_in·k ≥ 2048) take oneDNN and stay the convolution."""
    gemm("onednn")
    layer, aten_op = CHUNK_LAYERS[kind]
    x = torch.randn(1, 512, 8)
    with torch.no_grad(), OpCounter() as seen:
        got = layer(x)
        want = aten_op(x.double(), layer.weight.double(), layer.bias.double())
    assert seen.ops["_linear_pointwise"] == 1, dict(seen.ops)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
