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
from ate_fast.ops.weight_packs import WeightPacks, packing, packs_weight

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not weight_packs.packing_available()[0],
        reason=f"this torch cannot pack oneDNN weights: {weight_packs.packing_available()[1]}",
    ),
]


# a copy's check (weight_packs._same_product), once per kind of copy and row count: random
# rows times the copy, and order-exposing rows times a copy of the same kind reordered for
# them, each against the unpacked product (float32: both on oneDNN's op; bfloat16: the
# unpacked one ATen's)
CHECK_REORDERS = 1
CHECK_PACKED_PRODUCTS = 2


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
        # (CHECK_*), in the first call only
        checks = 2 if call == 0 else 0
        assert seen.ops["_reorder_linear_weight"] == (
            (2 if call == 0 else 0) + checks * CHECK_REORDERS
        ), dict(seen.ops)
        assert seen.ops["_linear_pointwise"] == 4 + checks * 2 * CHECK_PACKED_PRODUCTS
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
        checked = len(layers) + 2 * CHECK_PACKED_PRODUCTS * probes
        assert seen.ops["_linear_pointwise"] == checked, (rows, dict(seen.ops))


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
        checks = 2 if call == 0 else 0  # the weight's and its transpose's copies
        assert seen.ops["_reorder_linear_weight"] == checks * (1 + CHECK_REORDERS)
        onednn = 4 if dtype == torch.float32 else 0  # the plain weight on oneDNN's op
        probes = checks * CHECK_PACKED_PRODUCTS * (2 if onednn else 1)  # + the unpacked
        assert seen.ops["_linear_pointwise"] == onednn + probes
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
    assert reorders == 1 + CHECK_REORDERS  # the first copy of its kind is checked
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
    packs.clear()  # the checks too
    fresh, reorders = _after(packs, layer, x)
    assert reorders == 1 + CHECK_REORDERS and not torch.equal(fresh, before)


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


# the flow head's kinds of copy at 50 rows: [256, 256] (q, o, the time MLP's second layer),
# [128, 256] (k|v), [2048, 256] (gate|up), [256, 1024] (down)
KINDS = 4


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
        # 4 blocks x 5 GEMMs + the time MLP's second layer; in the first call each kind of
        # copy checked too (the checks are kept when the weights change)
        checks = KINDS * CHECK_REORDERS if call == 0 else 0
        assert seen.ops["_reorder_linear_weight"] == (0 if call == 1 else 21) + checks, seen.ops
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    captured.clear_weight_packs()  # the checks too
    with OpCounter() as seen:
        captured(noise, cond)
    assert seen.ops["_reorder_linear_weight"] == 21 + KINDS * CHECK_REORDERS


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
            # the weight's three GEMMs and its transpose's (the input-VJP) on their copies
            # where those are exact (both on torch 2.13; torch 2.4.1's transposed copy is
            # not, and that GEMM stays ATen's)
            forward = packs_weight(layer.weight, 50)
            read = 3 * forward + packs_weight(layer.weight.t(), 50)
        # each copy's product checked against ATen's (CHECK_*) in the first call
        checks = 2 if call == 0 else 0
        assert forward
        assert seen.ops["_linear_pointwise"] == read + checks * CHECK_PACKED_PRODUCTS, seen.ops
        assert seen.ops["_reorder_linear_weight"] == checks * (1 + CHECK_REORDERS)
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


def _summed(terms: torch.Tensor, order: str) -> torch.Tensor:
    """Σ_k ``terms`` [rows, N, K] in float32, one rounding per add, in a kernel's ``order``."""
    t = terms.float()

    def running(ts: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(ts.shape[:-1])
        for k in range(ts.shape[-1]):
            acc = acc + ts[..., k]
        return acc

    if order == "sequential":
        return running(t)
    if order == "reversed":
        return running(t.flip(-1))
    if order == "halves":  # K split in two, the halves' sums added
        half = t.shape[-1] // 2
        return running(t[..., :half]) + running(t[..., half:])
    if order == "lanes":  # 16 accumulators over k mod 16, then added in turn
        return running(torch.stack([running(t[..., j::16]) for j in range(16)], dim=-1))
    if order == "pairs":  # each pair's odd term first (AVX-512 BF16's dot product)
        return running(t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2))
    raise ValueError(order)


ORDERS = ("sequential", "reversed", "halves", "lanes", "pairs")


@pytest.mark.parametrize("k", [64, 256, 1024])
def test_the_order_probe_sees_every_reordering_in_bfloat16(k):
    """The check's second probe (weight_packs._order_probe): its products are exact and
    each row sums to 0 exactly, yet any two of five summation orders give different
    bfloat16 results at one row — where random rows miss some of them (why the probe is
    there: torch 2.4.1's oneDNN packed a bf16 weight whose product was one ulp off on 2 of
    12 800 elements, unseen by the random probe alone)."""
    like = torch.empty(32, k, dtype=torch.bfloat16)
    weight, rows = weight_packs._order_probe(like, 1)
    assert weight.dtype == rows.dtype == torch.bfloat16 and rows.shape == (1, k)
    products = rows.double()[:, None, :] * weight.double()[None, :, :]
    assert torch.equal(products.float().double(), products)  # exact in float32
    assert torch.equal(products.sum(-1), torch.zeros(1, 32))  # each row's exact sum
    gen = torch.Generator().manual_seed(1)
    random_rows = torch.randn(1, k, generator=gen).bfloat16()
    random_weight = torch.randn(32, k, generator=gen).bfloat16()
    random_terms = random_rows.float()[:, None, :] * random_weight.float()[None, :, :]
    order_out = {o: _summed(products, o).bfloat16() for o in ORDERS}
    random_out = {o: _summed(random_terms, o).bfloat16() for o in ORDERS}
    pairs = [(a, b) for i, a in enumerate(ORDERS) for b in ORDERS[i + 1 :]]
    for a, b in pairs:
        assert not torch.equal(order_out[a], order_out[b]), (a, b)
    assert any(torch.equal(random_out[a], random_out[b]) for a, b in pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 50])
def test_a_copy_that_sums_in_another_order_is_not_read(monkeypatch, dtype, rows):
    """A packed kernel that adds K's two halves separately (emulated: the "copy" a plain
    tensor, its product the halves' float32 products added) is caught at every row count
    and left unread; one that computes the unpacked product exactly (the control) is read."""
    monkeypatch.setattr(weight_packs, "_reorder", lambda w, hint: w.contiguous().clone())
    layer = _layer().to(dtype)
    half = layer.weight.shape[1] // 2

    def halves(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        x, w = x.float(), packed.float()
        return (x[:, :half] @ w[:, :half].t() + x[:, half:] @ w[:, half:].t()).to(dtype)

    def exact(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        if dtype == torch.bfloat16:
            return torch.nn.functional.linear(x, packed)
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    for product, read in ((halves, False), (exact, True)):
        monkeypatch.setattr(weight_packs, "_packed_product", product)
        packs = WeightPacks()
        with packing(packs):
            assert (packs.exact_copy(layer.weight, rows) is not None) == read, product
