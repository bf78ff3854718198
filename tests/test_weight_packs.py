"""A captured CPU sampler's oneDNN weights packed once (ops/weight_packs.py): the products
match the unpacked ones, a weight is packed once for all calls, every way a weight can
change between calls (in place, through ``.data``, rebound, freed) is seen, and a call
chooses oneDNN once per weight (what may change between its GEMMs checked at each)."""

from __future__ import annotations

import collections
import gc

import pytest
import torch
from op_counts import OpCounter  # tests/ is on sys.path
from torch import nn

from ate_fast import FlowSampler
from ate_fast.models import cpu_gemm, make_head
from ate_fast.ops import weight_packs
from ate_fast.ops.weight_packs import WeightPacks, packing

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not weight_packs.packing_available()[0],
        reason=f"this torch cannot pack oneDNN weights: {weight_packs.packing_available()[1]}",
    ),
]


@pytest.fixture(autouse=True)
def onednn(monkeypatch):
    """oneDNN takes the GEMMs on any x86 CPU (``auto`` keeps MKL on an Intel one)."""
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "onednn")
    monkeypatch.delenv(weight_packs.ENV_VAR, raising=False)


def _layer(seed: int = 0, n: int = 1024, k: int = 256) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n).requires_grad_(False)


def _products(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, r: torch.Tensor) -> tuple:
    """Each of cpu_gemm's oneDNN entry points on ``layer``'s weight."""
    w = layer.weight
    return (
        cpu_gemm.linear_of(layer, x),
        cpu_gemm.linear(x, w),
        cpu_gemm.times_weight(g, w),  # the input-VJP: the weight's transposed view
        cpu_gemm.linear_residual_rows(x, w, r),
    )


def _inputs(batch_rows: int = 50) -> tuple:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch_rows, 256, generator=gen),
        torch.randn(batch_rows, 1024, generator=gen),
        torch.randn(batch_rows, 1024, generator=gen),
    )


def test_packed_products_match_and_are_packed_once():
    layer, packs = _layer(), WeightPacks()
    x, g, r = _inputs()
    want = _products(layer, x, g, r)
    for call in range(3):
        with packing(packs), OpCounter() as seen:
            got = _products(layer, x, g, r)
        # the weight and its transpose: one reorder each, and each copy's product checked
        # on probe rows (two products), in the first call only
        assert seen.ops["_reorder_linear_weight"] == (2 if call == 0 else 0), dict(seen.ops)
        assert seen.ops["_linear_pointwise"] == (4 + 2 * 2 if call == 0 else 4)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert len(packs) == 2
    with OpCounter() as seen:  # outside a scope: the plain weight
        _products(layer, x, g, r)
    assert "_reorder_linear_weight" not in seen.ops


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "transposed"])
def test_a_call_computes_the_unpacked_products_bit_for_bit(transposed):
    """Widths and row counts as a head's GEMMs take them: each reads the packed copy where
    its product is the plain weight's (checked once per copy and rows on probe rows), else
    the plain weight — bit for bit the unpacked product either way. Here on an AMD EPYC
    (Zen 4) torch 2.13 reads the plain transposed weights at one row; torch 2.11 at one
    and two rows, and the transposed [256, 1024] at every row count."""
    packs, gen = WeightPacks(), torch.Generator().manual_seed(3)
    for n, k in ((4, 256), (256, 256), (256, 1024), (2048, 256)):
        w = torch.randn(k, n, generator=gen).t() if transposed else torch.randn(n, k, generator=gen)
        weight = nn.Parameter(w, requires_grad=False)
        for rows in (1, 2, 16, 50, 100):
            x = torch.randn(rows, k, generator=gen)
            want = cpu_gemm.linear(x, weight)
            for _ in range(2):  # the copy's verdict made, then reused
                with packing(packs):
                    got = cpu_gemm.linear(x, weight)
                assert torch.equal(got, want), (n, k, rows)
            copy = packs.exact_copy(weight, rows)
            assert copy is None or copy is not weight


def test_one_check_per_kind_of_copy():
    """Weights of one shape, layout and dtype, at the same rows: their copies' products are
    checked once (oneDNN picks its kernels by these, not by the values); another row count
    is checked again."""
    layers, packs = [_layer(seed) for seed in range(3)], WeightPacks()
    x = _inputs()[0]
    for rows, probes in ((50, 1), (10, 1), (50, 0)):
        with packing(packs), OpCounter() as seen:
            for layer in layers:
                cpu_gemm.linear_of(layer, x[:rows])
        assert seen.ops["_linear_pointwise"] == len(layers) + 2 * probes, (rows, dict(seen.ops))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_copy_whose_product_differs_is_not_read(monkeypatch, dtype):
    """A packed copy whose product is not the plain weight's (here: made from another
    weight, ``w + 1``) is made, checked and left unread: float32 runs oneDNN on the plain weight,
    bfloat16 ATen's op, as a call without packs does."""
    if dtype == torch.bfloat16 and not weight_packs.bf16_packing_available():
        pytest.skip("a CPU oneDNN runs no bf16 on: no bf16 copies (test_bf16_parameters_...)")
    reorder = weight_packs._reorder
    monkeypatch.setattr(weight_packs, "_reorder", lambda w, rows: reorder(w + 1, rows))
    layer, packs = _layer().to(dtype), WeightPacks()
    x, g, r = (t.to(dtype) for t in _inputs())
    want = _products(layer, x, g, r)
    for call in range(2):
        with packing(packs), OpCounter() as seen:
            got = _products(layer, x, g, r)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert seen.ops["_reorder_linear_weight"] == (2 if call == 0 else 0)
        probes = 2 if call == 0 else 0  # the copies' packed products on probe rows
        onednn = 4 if dtype == torch.float32 else 0  # the plain weight on oneDNN's op
        assert seen.ops["_linear_pointwise"] == onednn + probes * (2 if onednn else 1)
    assert len(packs) == 2 and packs.exact_copy(layer.weight, 50) is None


def _after(packs: WeightPacks, layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The packed product in a new call, and how many reorders it ran."""
    with packing(packs), OpCounter() as seen:
        out = cpu_gemm.linear_of(layer, x)
    return out, seen.ops["_reorder_linear_weight"]


@pytest.mark.parametrize("how", ["in_place", "data", "numpy", "load_state_dict", "rebound"])
def test_a_changed_weight_is_packed_again(how):
    layer, packs = _layer(), WeightPacks()
    x = _inputs()[0]
    _after(packs, layer, x)
    version = layer.weight._version
    new = torch.randn_like(layer.weight)
    if how == "in_place":
        with torch.no_grad():
            layer.weight.mul_(-2.0)
    elif how == "data":  # no version counter moves: the probes see it
        layer.weight.data.copy_(new)
    elif how == "numpy":
        layer.weight.detach().numpy()[:] = new.numpy()
    elif how == "load_state_dict":
        layer.load_state_dict({"weight": new, "bias": layer.bias.clone()})
    else:
        layer.weight = nn.Parameter(new, requires_grad=False)
    if how in ("data", "numpy"):
        assert layer.weight._version == version  # what makes the probes necessary
    got, reorders = _after(packs, layer, x)
    assert reorders == 1
    torch.testing.assert_close(got, cpu_gemm.linear_of(layer, x), rtol=1e-6, atol=1e-5)


def test_a_transposed_parameter_is_probed_in_place():
    """A parameter stored transposed ([K, N] memory, an [N, K] view): its probes index it
    where it lies, and a write through ``.data`` is seen."""
    layer, packs = _layer(), WeightPacks()
    layer.weight = nn.Parameter(torch.randn(256, 1024).t(), requires_grad=False)
    assert not layer.weight.is_contiguous()
    x = _inputs()[0]
    _, reorders = _after(packs, layer, x)
    assert reorders == 1
    layer.weight.data.mul_(-1.0)
    got, reorders = _after(packs, layer, x)
    assert reorders == 1
    torch.testing.assert_close(got, cpu_gemm.linear_of(layer, x), rtol=1e-6, atol=1e-5)


def test_an_unchanged_weight_is_checked_not_repacked():
    layer, packs = _layer(), WeightPacks()
    x = _inputs()[0]
    first, _ = _after(packs, layer, x)
    with torch.no_grad():  # a write that leaves the values: the counter moves, packed again
        layer.weight.copy_(layer.weight.clone())
    again, reorders = _after(packs, layer, x)
    assert reorders == 1 and torch.equal(first, again)
    same, reorders = _after(packs, layer, x)
    assert reorders == 0 and torch.equal(first, same)


def test_a_write_between_probes_is_the_documented_blind_spot():
    """One value changed off the probed places through ``.data``: unseen until ``clear``
    (what the module's docs and ``clear_weight_packs`` say)."""
    layer, packs = _layer(), WeightPacks()
    x = _inputs()[0]
    before, _ = _after(packs, layer, x)
    layer.weight.data[0, 1] += 1.0  # flat place 1: not a probe of a 262 144-value weight
    stale, reorders = _after(packs, layer, x)
    assert reorders == 0 and torch.equal(stale, before)
    packs.clear()
    fresh, reorders = _after(packs, layer, x)
    assert reorders == 1 and not torch.equal(fresh, before)


def test_only_parameters_are_packed():
    packs = WeightPacks()
    x = _inputs()[0]
    weight = torch.randn(1024, 256)
    for _ in range(2):
        with packing(packs), OpCounter() as seen:
            cpu_gemm.linear(x, weight)
            cpu_gemm.linear(x, nn.Parameter(weight).detach())
        assert "_reorder_linear_weight" not in seen.ops
    assert len(packs) == 0
    with torch.inference_mode():
        made_inside = nn.Parameter(torch.randn(1024, 256), requires_grad=False)
    with packing(packs):
        cpu_gemm.linear(x, made_inside)
    assert len(packs) == 0


def test_a_freed_parameter_drops_its_copy():
    layer, packs = _layer(), WeightPacks()
    _after(packs, layer, _inputs()[0])
    assert len(packs) == 1
    del layer
    gc.collect()
    assert len(packs) == 0


def test_off_and_nested_scopes(monkeypatch):
    layer, outer, inner = _layer(), WeightPacks(), WeightPacks()
    x = _inputs()[0]
    with packing(outer), packing(inner):  # the inner call shares the outer one's packs
        cpu_gemm.linear_of(layer, x)
    assert len(outer) == 1 and len(inner) == 0
    monkeypatch.setenv(weight_packs.ENV_VAR, "off")
    _, reorders = _after(WeightPacks(), layer, x)
    assert reorders == 0
    monkeypatch.setenv(weight_packs.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match=r"ATE_FAST_CPU_WEIGHT_PACKS.*'on', 'off'"):
        _after(WeightPacks(), layer, x)


def _flow_head_and_inputs():
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small").eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, head.config.horizon, head.config.action_dim, generator=gen)
    cond = head.prefix_cache(torch.randn(1, 16, head.config.width, generator=gen))
    return head, noise, cond


def test_a_captured_sampler_packs_once_and_follows_training():
    """capture() on the CPU: its calls match sample() (which packs nothing) while the
    head's weights are trained between calls, and only the first call after each change
    reorders."""
    head, noise, cond = _flow_head_and_inputs()
    sampler = FlowSampler(head, 4)
    captured = sampler.capture(noise, cond, check_finite=False)
    params = [p for p in head.parameters() if p.dim() == 2]
    for call in range(4):
        if call == 2:  # an optimizer-like in-place step on every weight
            with torch.no_grad():
                for p in params:
                    p.add_(0.01 * torch.randn_like(p))
        if call == 3:  # an EMA-style update through .data
            for p in params:
                p.data.mul_(0.5)
        with OpCounter() as seen:
            got = captured(noise, cond).clone()
        with OpCounter() as plain:
            want = sampler.sample(noise, cond, check_finite=False)
        assert "_reorder_linear_weight" not in plain.ops
        # 4 blocks x 5 GEMMs + the time MLP's second layer
        assert seen.ops["_reorder_linear_weight"] == (0 if call == 1 else 21), (call, seen.ops)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    captured.clear_weight_packs()
    with OpCounter() as seen:
        captured(noise, cond)
    assert seen.ops["_reorder_linear_weight"] == 21


def test_bf16_parameters_read_packed_copies_inside_a_call():
    """bfloat16, which ATen runs on oneDNN's matmul already, takes oneDNN's op only inside
    a call and only for a weight of at least BF16_MIN_WEIGHT elements: the same product,
    bit for bit, from a copy packed once."""
    layer, packs = _layer(n=1024).bfloat16(), WeightPacks()
    small = _layer(n=256).bfloat16()  # [256, 256]: under the threshold
    assert small.weight.numel() < cpu_gemm.BF16_MIN_WEIGHT <= layer.weight.numel()
    x, g, r = (t.bfloat16() for t in _inputs())
    want = _products(layer, x, g, r)
    with OpCounter() as seen:
        _products(layer, x, g, r)
    assert "_linear_pointwise" not in seen.ops  # outside a call: ATen's ops
    if not weight_packs.bf16_packing_available():  # a CPU oneDNN runs no bf16 on
        with packing(packs), OpCounter() as seen:
            _products(layer, x, g, r)
        assert "_linear_pointwise" not in seen.ops and len(packs) == 0
        return
    for call in range(2):
        with packing(packs), OpCounter() as seen:
            got = _products(layer, x, g, r)
            cpu_gemm.linear_of(small, x)
        # each copy's product checked against ATen's on probe rows in the first call
        assert seen.ops["_linear_pointwise"] == (4 + 2 if call == 0 else 4), dict(seen.ops)
        assert seen.ops["_reorder_linear_weight"] == (2 if call == 0 else 0)
        for a, b in zip(got, want):
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, b)


def test_a_call_chooses_once_per_weight(monkeypatch):
    """Inside a captured call each weight's GEMM runs the full oneDNN choice once (its
    first step); the later steps reuse it, and the call still matches sample()."""
    head, noise, cond = _flow_head_and_inputs()
    sampler = FlowSampler(head, 4)
    captured = sampler.capture(noise, cond, check_finite=False)
    captured(noise, cond)
    chosen = collections.Counter()
    full_choice = cpu_gemm.onednn_takes

    def counting(x, weight, *others):
        takes = full_choice(x, weight, *others)
        chosen[weight.data_ptr()] += takes
        return takes

    monkeypatch.setattr(cpu_gemm, "onednn_takes", counting)
    got = captured(noise, cond).clone()
    assert len(chosen) >= 21 and max(chosen.values()) == 1, chosen  # 4 steps, one choice
    monkeypatch.setattr(cpu_gemm, "onednn_takes", full_choice)
    torch.testing.assert_close(got, sampler.sample(noise, cond), rtol=1e-5, atol=1e-5)


def test_a_chosen_weight_is_not_reused_where_it_must_not_be():
    """What may change between GEMMs of one call is checked at each: with grad recording
    ATen's op runs (the weight's gradient is formed); a non-contiguous input is taken as
    the full choice takes it; another row count chooses again."""
    layer, packs = _layer().requires_grad_(True), WeightPacks()
    x = _inputs()[0]
    want = torch.nn.functional.linear(x, layer.weight.detach(), layer.bias.detach())
    with packing(packs):
        with torch.no_grad():
            cpu_gemm.linear_of(layer, x)
            assert packs.chosen(layer.weight, 50, torch.float32) is not None
        leaf = x.clone().requires_grad_()
        recorded = cpu_gemm.linear_of(layer, leaf)
        with torch.no_grad():
            strided = cpu_gemm.linear_of(layer, torch.stack([x, x], dim=-1)[..., 0])
            fewer = cpu_gemm.linear_of(layer, x[:10])
        assert packs.chosen(layer.weight, 10, torch.float32) is not None
    recorded.sum().backward()
    assert leaf.grad is not None and layer.weight.grad is not None
    for got, ref in ((recorded, want), (strided, want), (fewer, want[:10])):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-6, atol=1e-5)
    assert packs.chosen(layer.weight, 50, torch.float32) is None  # they end with the call
