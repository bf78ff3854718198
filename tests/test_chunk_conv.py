"""The U-Net's convolutions as row-major GEMMs at batch 1 on the CPU (models/chunk_conv.py):
the row forms against ATen's convolutions in float64, the modules' choice of path, their
gradients, and graph captures that keep the convolution op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ate_fast.models import chunk_conv
from ate_fast.models.chunk_conv import (
    ChunkConv1d,
    ChunkConvTranspose1d,
    conv1d_rows,
    conv_transpose1d_rows,
    use_chunk_convs,
)

# The weight threshold scales with torch's thread count: the cases here assume one.
pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, C_in, C_out, k, stride, padding, L): the U-Net's shapes and odd ones
CONV_SHAPES = [
    (1, 64, 64, 5, 1, 2, 8),
    (1, 7, 5, 3, 2, 1, 16),
    (3, 6, 9, 1, 1, 0, 4),
    (2, 4, 4, 5, 1, 0, 9),
    (1, 3, 8, 4, 3, 2, 11),
]
TRANSPOSE_SHAPES = [
    (1, 16, 16, 4, 2, 1, 4),
    (2, 5, 7, 3, 1, 0, 6),
    (1, 4, 6, 5, 3, 2, 3),
    (3, 2, 3, 1, 2, 0, 5),
]


ROW_FORMS = {  # kind -> (the row form, ATen's op, weight shape from (C_in, C_out, k))
    "conv": (conv1d_rows, F.conv1d, lambda c_in, c_out, k: (c_out, c_in, k)),
    "transpose": (
        conv_transpose1d_rows,
        F.conv_transpose1d,
        lambda c_in, c_out, k: (c_in, c_out, k),
    ),
}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("kind", "batch", "c_in", "c_out", "k", "stride", "padding", "steps"),
    [("conv", *shape) for shape in CONV_SHAPES]
    + [("transpose", *shape) for shape in TRANSPOSE_SHAPES],
)
def test_row_forms_are_the_convolutions(kind, batch, c_in, c_out, k, stride, padding, steps, bias):
    rows_form, aten_op, weight_shape = ROW_FORMS[kind]
    gen = torch.Generator().manual_seed(steps * k + stride)
    x = torch.randn(batch, c_in, steps, dtype=torch.float64, generator=gen)
    weight = torch.randn(weight_shape(c_in, c_out, k), dtype=torch.float64, generator=gen)
    b = torch.randn(c_out, dtype=torch.float64, generator=gen) if bias else None
    expected = aten_op(x, weight, b, stride=stride, padding=padding)
    got = rows_form(x, weight, b, stride, padding)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_weight_threshold_scales_with_threads(monkeypatch):
    calls = _counting(monkeypatch, "conv1d_rows")
    layer, x = ChunkConv1d(64, 64, 5, padding=2), torch.randn(1, 64, 8)  # 20 480 weights
    layer(x)
    assert len(calls) == 1
    torch.set_num_threads(2)  # ATen's path parallelises; 40 000 weights needed now
    layer(x)
    assert len(calls) == 1
    ChunkConv1d(128, 128, 3, padding=1)(torch.randn(1, 128, 8))  # 49 152 weights
    assert len(calls) == 2


def _counting(monkeypatch, name: str) -> list[int]:
    """Count the calls of chunk_conv's row form ``name``."""
    calls: list[int] = []
    original = getattr(chunk_conv, name)

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(chunk_conv, name, counted)
    return calls


def _pair(transposed: bool, c: int, k: int) -> tuple[nn.Module, nn.Module]:
    """A chunk layer and the plain ``nn`` layer with the same parameters."""
    torch.manual_seed(0)
    if transposed:
        plain: nn.Module = nn.ConvTranspose1d(c, c, k, stride=2, padding=1)
        chunk: nn.Module = ChunkConvTranspose1d(c, c, k, stride=2, padding=1)
    else:
        plain, chunk = nn.Conv1d(c, c, k, padding=k // 2), ChunkConv1d(c, c, k, padding=k // 2)
    chunk.load_state_dict(plain.state_dict())  # the same parameters and keys
    return chunk, plain


@pytest.mark.parametrize(
    ("transposed", "channels", "k", "batch", "steps", "dtype", "rows"),
    [
        (False, 64, 5, 1, 8, torch.float32, True),  # 20 480 weights, 8 steps
        (False, 64, 5, 1, 16, torch.float32, False),  # 16 output steps: ATen's path
        (False, 64, 5, 2, 8, torch.float32, False),  # batch 2: oneDNN
        (False, 32, 5, 1, 8, torch.float32, False),  # 5 120 weights: too small to pay
        (False, 64, 5, 1, 8, torch.float64, False),  # float32 and bfloat16 only
        (False, 64, 5, 1, 8, torch.bfloat16, True),
        (True, 128, 4, 1, 4, torch.float32, True),  # 65 536 weights, 4 input steps
        (True, 64, 4, 1, 4, torch.float32, False),  # 16 384 weights
        (True, 128, 4, 1, 16, torch.float32, False),
        (True, 128, 4, 1, 4, torch.bfloat16, False),  # taps would be summed in bf16
    ],
)
def test_chunk_layers_take_the_row_form_where_it_pays(
    monkeypatch, transposed, channels, k, batch, steps, dtype, rows
):
    calls = _counting(monkeypatch, "conv_transpose1d_rows" if transposed else "conv1d_rows")
    chunk, plain = (m.to(dtype) for m in _pair(transposed, channels, k))
    x = torch.randn(batch, channels, steps, dtype=dtype)
    got, expected = chunk(x), plain(x)
    assert len(calls) == (1 if rows else 0)
    if dtype == torch.bfloat16:  # both accumulate in float32 and round once: ≤ 1 bf16 ulp
        got, expected = got.float(), expected.float()
        atol = 1e-3 * expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=atol)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("steps, padding", [(1, 3), (1, 2), (2, 4)])
def test_an_output_too_short_is_the_parents_error(steps, padding):
    """L_out = (L − 1)·stride + k − 2·padding ≤ 0: the row form sliced an empty (or
    negative) range and returned [B, C_out, 0] where nn.ConvTranspose1d raises."""
    chunk, plain = _pair(True, 160, 4)
    chunk.stride = plain.stride = (2,)
    chunk.padding = plain.padding = (padding,)
    x = torch.randn(1, 160, steps)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        plain(x)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        chunk(x)


def test_bf16_row_form_rounds_once():
    """bf16 ChunkConv1d: the float64 convolution of the same (bf16) values, rounded once to
    bfloat16 — per element within half a bf16 ulp (≤ 2⁻⁸ relative) plus float32 summation
    error; a bf16 accumulation of the 640 products would miss it by far."""
    layer = ChunkConv1d(128, 96, 5, padding=2).to(torch.bfloat16)
    x = torch.randn(1, 128, 8).to(torch.bfloat16)
    got = layer(x).double()
    ref = F.conv1d(x.double(), layer.weight.double(), layer.bias.double(), padding=2)
    bound = 2**-8 * ref.abs() + 1e-5 * ref.abs().max()
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() - bound).max()


@pytest.mark.parametrize("transposed", [False, True])
def test_row_form_gradients_match_the_convolution(monkeypatch, transposed):
    calls = _counting(monkeypatch, "conv_transpose1d_rows" if transposed else "conv1d_rows")
    chunk, plain = _pair(transposed, 128, 4 if transposed else 5)
    x = torch.randn(1, 128, 4, requires_grad=True)
    out_weight = torch.randn(chunk(x).shape)  # a random cotangent, the same for both
    calls.clear()
    grads = []
    for module in (chunk, plain):
        loss = (module(x) * out_weight).sum()
        grads.append(torch.autograd.grad(loss, (x, module.weight, module.bias)))
    assert len(calls) == 1
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_layers_that_are_not_plain_keep_atens_path(monkeypatch):
    calls = _counting(monkeypatch, "conv1d_rows")
    x = torch.randn(1, 64, 8)
    for layer in (
        ChunkConv1d(64, 64, 5, padding=4, dilation=2),
        ChunkConv1d(64, 64, 5, padding=2, groups=2),
        ChunkConv1d(64, 64, 5, padding=2, padding_mode="circular"),
        ChunkConv1d(64, 64, 5, padding="same"),
    ):
        assert layer(x).shape == (1, 64, 8)
    assert calls == []


def test_graph_captures_keep_the_convolution_op(monkeypatch):
    """torch.export (non-strict, as ate_fast's ONNX export runs it), torch.jit.trace and
    torch.compile see Conv1d / ConvTranspose1d, not the row form, at the batch where eager
    takes it."""
    calls = _counting(monkeypatch, "conv1d_rows")
    calls_t = _counting(monkeypatch, "conv_transpose1d_rows")
    model = nn.Sequential(ChunkConv1d(64, 64, 5, padding=2), ChunkConvTranspose1d(64, 128, 4, 2, 1))
    x = torch.randn(1, 64, 8)
    model(x)
    assert (len(calls), len(calls_t)) == (1, 1)  # eager: the row forms
    program = torch.export.export(model, (x,), strict=False)
    assert (len(calls), len(calls_t)) == (1, 1)  # the export did not take them
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("conv1d" in t or "convolution" in t for t in targets), targets
    assert any("conv_transpose1d" in t or "convolution" in t for t in targets), targets
    traced = torch.jit.trace(model, (x,), check_trace=False)  # the check reruns it eagerly
    assert (len(calls), len(calls_t)) == (1, 1)  # nor the trace
    assert "conv" in str(traced.inlined_graph)
    seen: list[str] = []

    def backend(graph_module, example_inputs):  # records what Dynamo traced, runs it as is
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x)
    assert (len(calls), len(calls_t)) == (1, 1)  # nor torch.compile
    assert any("conv1d" in t for t in seen) and any("conv_transpose1d" in t for t in seen), seen
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_use_chunk_convs_reclasses_in_place_and_restores(monkeypatch):
    calls = _counting(monkeypatch, "conv1d_rows")

    class OwnConv(nn.Conv1d):  # a subclass may have a forward of its own: left alone
        pass

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(64, 64, 5, padding=2),
        nn.Conv2d(3, 3, 1),
        OwnConv(64, 64, 1),
        nn.ConvTranspose1d(64, 64, 4, 2, 1),
    )
    layers, keys = list(model), list(model.state_dict())
    x = torch.randn(1, 64, 8)
    expected = model[3](model[2](model[0](x)))
    restore = use_chunk_convs(model)
    assert list(model) == layers and list(model.state_dict()) == keys  # the same objects
    assert [type(m) for m in model] == [ChunkConv1d, nn.Conv2d, OwnConv, ChunkConvTranspose1d]
    got = model[3](model[2](model[0](x)))
    assert len(calls) == 1  # the first conv took the row form
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    restore()
    assert [type(m) for m in model] == [nn.Conv1d, nn.Conv2d, OwnConv, nn.ConvTranspose1d]
    restore()  # idempotent
    assert type(model[0]) is nn.Conv1d
