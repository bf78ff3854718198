"""The few-row GEMM kernel (``ate_fast.models.skinny_gemm``): against float64 on random
inputs in every storage dtype and column tile, on the CPU through the Triton interpreter
(and on a GPU where there is one); inside the flow-transformer head and its captured
sampler; and where torch's GEMM must run instead."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import (  # tests/ is on sys.path
    LaunchCounter,
    assert_compile_traces_torch_ops,
    assert_path_matches,
    captured,
    small_head,
)

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import skinny_gemm
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

F64 = torch.float64
# the relative error bound of one rounding to the dtype (bfloat16 in the interpreter: a
# whole ulp, it truncates) and of a float32 sum of K products, as a multiple of √K·u
UNIT = {F64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv(skinny_gemm.ENV_VAR, "triton")
    return monkeypatch


def _operands(rows, k, n, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + rows + k + n)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(device, dtype)

    return rand(rows, k), rand(n, k, scale=k**-0.5), rand(n), rand(rows, n)


def _check(got, x, w, b, r, dtype):
    """``got`` within a few roundings of the float64 product of the operands it was given
    (so only the kernel's own error counts): the output's rounding plus the accumulator's
    (float64 / float32) over K terms, relative to the terms' magnitudes."""
    x64, w64 = x.to(F64), w.to(F64)
    ref = x64 @ w64.T
    scale = x64.abs() @ w64.abs().T
    if b is not None:
        ref, scale = ref + b.to(F64), scale + b.to(F64).abs()
    if r is not None:
        ref, scale = ref + r.to(F64), scale + r.to(F64).abs()
    acc = UNIT[F64] if dtype == F64 else UNIT[torch.float32]
    bound = UNIT[dtype] * ref.abs() + 4 * acc * x.shape[-1] ** 0.5 * scale + 1e-300
    err = (got.to(F64) - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n", skinny_gemm.BLOCK_NS)
@pytest.mark.parametrize(("rows", "k", "n"), [(50, 256, 96), (1, 200, 40), (64, 96, 130)])
def test_kernel_matches_float64(triton_path, dtype, block_n, rows, k, n):
    """Uneven K (200, 96 in bf16's 128-wide steps) and N (40, 130), one row and a full
    row tile; with bias and residual, and without."""
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, str(block_n))
    x, w, b, r = _operands(rows, k, n, dtype)
    _check(skinny_gemm.skinny_linear(x, w), x, w, None, None, dtype)
    _check(skinny_gemm.skinny_linear(x, w, b, r), x, w, b, r, dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", ["2", "3", "64", "auto"])
@pytest.mark.parametrize(("rows", "k", "n"), [(50, 1000, 48), (3, 512, 32)])
def test_split_k_matches_float64(triton_path, dtype, split, rows, k, n):
    """K in slices (their partial products summed by the second kernel): uneven K (1000:
    the last slice short, its last step masked), more slices asked for than K has steps
    (64: one per step), and the auto split (the CPU's notional 4 SMs: 3 or 2 column tiles,
    so it splits); with bias and residual, and without. Every call did split."""
    from ate_fast.models import skinny_gemm_triton as sgt

    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "16")
    x, w, b, r = _operands(rows, k, n, dtype)
    splits, k_splits = [], sgt.k_splits

    def counted(*args):
        splits.append(k_splits(*args))
        return splits[-1]

    with mock.patch.object(sgt, "k_splits", counted):
        _check(skinny_gemm.skinny_linear(x, w), x, w, None, None, dtype)
        _check(skinny_gemm.skinny_linear(x, w, b, r), x, w, b, r, dtype)
    assert len(splits) == 2 and min(count for count, _ in splits) > 1, splits


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", ["1", "3"])
@pytest.mark.parametrize(("rows", "k", "n"), [(50, 256, 96), (1, 200, 48), (52, 1024, 32)])
def test_weight_as_stored_matches_float64(triton_path, dtype, split, rows, k, n):
    """``x · W`` for ``W`` [K, N] as stored (a layer's input-VJP through its weight
    [out, in]): against float64, uneven K, with the residual and without, whole and in
    slices (summed by the second kernel and, with counters lent, in-kernel)."""
    from ate_fast.ops import split_counters

    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "16")
    x, w_nk, _, r = _operands(rows, k, n, dtype)
    w = w_nk.T.contiguous()  # [K, N]
    _check(skinny_gemm.skinny_matmul(x, w), x, w_nk, None, None, dtype)
    _check(skinny_gemm.skinny_matmul(x, w, r), x, w_nk, None, r, dtype)
    with split_counters.lend(split_counters.new_buffer(x.device)):
        _check(skinny_gemm.skinny_matmul(x, w, r), x, w_nk, None, r, dtype)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "k", "n", "split"), [(50, 1000, 48, 3), (1, 512, 32, 64)])
def test_in_kernel_sum_equals_the_sum_kernel(triton_path, dtype, rows, k, n, split):
    """With counters lent (as a captured graph lends them), each tile's last program sums
    the slices: no sum kernel launched, the output equal to the sum kernel's to the bit
    (same order, one rounding) and within the float64 bound, with bias and residual and
    without, and the counters left zero for the next launch."""
    from ate_fast.models import skinny_gemm_triton as sgt
    from ate_fast.ops import split_counters

    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, str(split))
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "16")
    x, w, b, r = _operands(rows, k, n, dtype)
    want = [skinny_gemm.skinny_linear(x, w), skinny_gemm.skinny_linear(x, w, b, r)]
    counters = split_counters.new_buffer(x.device)
    sums = LaunchCounter(sgt._split_sum_kernel)
    with mock.patch.object(sgt, "_split_sum_kernel", sums), split_counters.lend(counters):
        got = [skinny_gemm.skinny_linear(x, w), skinny_gemm.skinny_linear(x, w, b, r)]
        assert sums.count == 0
        triton_path.setenv(split_counters.ENV_VAR, "kernel")  # the sum kernel after all
        kernel_sum = skinny_gemm.skinny_linear(x, w, b, r)
        assert sums.count == 1
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kernel_sum, want[1])
    _check(got[1], x, w, b, r, dtype)
    assert not counters.any(), "the counters must be left zero"


ACTIVATIONS = {  # code name -> (act, act') in float64
    "gelu": (F.gelu, lambda u: 0.5 * (1 + torch.erf(u / 2**0.5)) + u * torch.exp(-u * u / 2)
             / (2 * torch.pi) ** 0.5),
    "silu": (F.silu, lambda u: torch.sigmoid(u) * (1 + u * (1 - torch.sigmoid(u)))),
    "relu": (F.relu, lambda u: (u > 0).to(u.dtype)),
    "tanh": (torch.tanh, lambda u: 1 - torch.tanh(u) ** 2),
}  # fmt: skip


def _within(got, ref, bound):
    err = (got.to(F64) - ref).abs()
    assert bool((err <= bound + 1e-300).all()), f"max err/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("split", ["1", "3"])
def test_activation_epilogues_match_float64(triton_path, dtype, name, split):
    """A Linear and its activation in one launch, ``(pre, act(pre))`` with ``pre = x·Wᵀ + b``
    kept in the compute dtype, and the input-VJP through the weight and the activation,
    ``(g·W) ⊙ act'(pre)`` (the weight as stored) — against float64: ``pre`` within the
    product's bound, ``act(pre)`` and the product's derivative factor within a few roundings
    of the compute dtype; whole and in slices, the slices summed by the sum kernel and, with
    counters lent, in-kernel, the two bit-equal (uneven K: 200)."""
    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "16")
    _check_activation_epilogues(name, 50, 200, 48, dtype, "cpu")


def _check_activation_epilogues(name, rows, k, n, dtype, device):
    """:func:`test_activation_epilogues_match_float64`'s checks: a Linear k -> n with its
    activation, and the VJP ``g [rows, k] · W [k, n] ⊙ act'(pre)`` (W the weight of a Linear
    n -> k) at the forward's ``pre``."""
    from ate_fast.ops import split_counters
    from ate_fast.ops.constants import ACTIVATIONS as CODES
    from ate_fast.ops.constants import compute_dtype

    act, grad = ACTIVATIONS[name]
    code, comp = CODES.index(name), compute_dtype(dtype)
    x, w, b, _ = _operands(rows, k, n, dtype, device)
    unit = UNIT[F64] if dtype == F64 else UNIT[torch.float32]
    pre, y = skinny_gemm.skinny_linear_act(x, w, b, code)
    assert pre.dtype == comp and y.dtype == dtype
    _check(pre, x, w, b, None, comp)
    want = act(pre.to(F64))
    _within(y, want, UNIT[dtype] * want.abs() + 16 * unit * (pre.to(F64).abs() + 1))
    g, weight = x, w.T.contiguous()
    dpre = skinny_gemm.skinny_matmul_act_grad(g, weight, pre, code)
    prod, scale = g.to(F64) @ weight.to(F64), g.to(F64).abs() @ weight.to(F64).abs()
    slope = grad(pre.to(F64))
    want = prod * slope
    bound = UNIT[dtype] * want.abs() + 4 * unit * k**0.5 * scale * slope.abs()
    _within(dpre, want, bound + 16 * unit * prod.abs() * (slope.abs() + 1))
    with split_counters.lend(split_counters.new_buffer(x.device)):  # the in-kernel sum
        again = skinny_gemm.skinny_linear_act(x, w, b, code)
        dpre_again = skinny_gemm.skinny_matmul_act_grad(g, weight, pre, code)
    assert torch.equal(again[0], pre) and torch.equal(again[1], y)
    assert torch.equal(dpre_again, dpre)
    other = torch.float16 if dtype == comp else dtype  # a dtype that is not the compute one
    for bad in (pre[:, :-1], pre.to(other), pre.T.contiguous().T):  # shape, dtype, layout
        with pytest.raises(InvalidArgumentError, match="pre must be a contiguous"):
            skinny_gemm.skinny_matmul_act_grad(g, weight, bad, code)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split", ["1", "auto"])
def test_encoder_activation_epilogues_on_cuda(triton_path, dtype, split):
    """The paper's encoder layer's linear1 + bias + GELU (512 -> 1024) and its VJP through
    W2 [512, 1024] and GELU at B = 1 (52 tokens) on the GPU, against float64, whole K and
    the auto split (each tile's sum by the sum kernel, and in-kernel on lent counters)."""
    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    _check_activation_epilogues("gelu", 52, 512, 1024, dtype, "cuda")


def test_split_counters_are_lent_to_their_launches_only(monkeypatch):
    """Counters are for launches inside :func:`lend` (nested: the inner ones), on the
    lender's device, with no more tiles than the buffer counts, unless
    ``ATE_FAST_SPLIT_REDUCE=kernel``; None anywhere else. The setting is checked."""
    from ate_fast.ops import split_counters

    cpu = torch.device("cpu")
    assert split_counters.for_launch(cpu, 1) is None
    outer, inner = split_counters.new_buffer(cpu), split_counters.new_buffer(cpu)
    assert outer.dtype == torch.int32 and outer.shape == (split_counters.CAPACITY,)
    assert not outer.any()
    with split_counters.lend(outer):
        assert split_counters.for_launch(cpu, split_counters.CAPACITY) is outer
        assert split_counters.for_launch(cpu, split_counters.CAPACITY + 1) is None
        assert split_counters.for_launch(torch.device("meta"), 1) is None
        with split_counters.lend(inner):
            assert split_counters.for_launch(cpu, 8) is inner
        assert split_counters.for_launch(cpu, 8) is outer
        monkeypatch.setenv(split_counters.ENV_VAR, " Kernel ")
        assert split_counters.for_launch(cpu, 8) is None
        monkeypatch.setenv(split_counters.ENV_VAR, "atomic")
        with pytest.raises(InvalidArgumentError, match="ATE_FAST_SPLIT_REDUCE: expected one of"):
            split_counters.for_launch(cpu, 8)
        monkeypatch.setenv(split_counters.ENV_VAR, "auto")
        assert split_counters.for_launch(cpu, 8) is outer
    assert split_counters.for_launch(cpu, 8) is None


def test_k_splits():
    """The auto split: whole where the tiles fill the SMs; else about two programs per SM,
    at least two K steps per slice; slices whole steps, equal but the last; an explicit
    count capped at one slice per step."""
    from ate_fast.models.skinny_gemm_triton import k_splits

    sms, bk = 132, 128  # an H200, bf16's K step
    assert k_splits(256, 1024, bk, None, sms) == (1, 1024)  # gate|up: 256 tiles
    assert k_splits(32, 2048, bk, None, sms) == (8, 256)  # o: 32 tiles, 16 steps
    assert k_splits(32, 4096, bk, None, sms) == (8, 512)  # down: 32 steps, 4 per slice
    assert k_splits(80, 1024, bk, None, sms) == (4, 256)  # q|kv: 80 tiles, 8 steps
    assert k_splits(4, 256, bk, None, sms) == (1, 256)  # two steps: one slice
    assert k_splits(32, 1000, bk, 3, sms) == (3, 384)  # 8 steps: 3 + 3 + 2
    assert k_splits(32, 1000, bk, 64, sms) == (8, 128)
    assert k_splits(32, 1000, bk, 1, sms) == (1, 1024)
    for n_tiles in range(1, 140):
        for steps in range(1, 40):
            splits, per = k_splits(n_tiles, steps * bk, bk, None, sms)
            assert per % bk == 0 and (splits - 1) * per < steps * bk <= splits * per
            assert splits == 1 or per >= 2 * bk


def test_leading_dims_and_the_block_sites(triton_path):
    """[B, H, K] inputs keep their leading dims; block_linear / block_linear_of /
    linear_residual run the kernel, equal to F.linear in float64."""
    from ate_fast.models.direct_weights import linear_residual

    x = torch.randn(2, 7, 48, dtype=F64)
    layer = torch.nn.Linear(48, 32, dtype=F64)
    plain = torch.nn.Linear(48, 32, bias=False, dtype=F64)
    res = torch.randn(2, 7, 32, dtype=F64)
    with (
        torch.no_grad(),
        mock.patch.object(skinny_gemm, "skinny_linear", wraps=skinny_gemm.skinny_linear) as kernel,
    ):
        outs = [
            skinny_gemm.block_linear(x, layer.weight, layer.bias),
            skinny_gemm.block_linear_of(layer, x),
            linear_residual(plain, x, res),
        ]
    assert kernel.call_count == 3
    refs = [F.linear(x, layer.weight, layer.bias)] * 2 + [res + F.linear(x, plain.weight)]
    for got, ref in zip(outs, refs):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


def test_where_torch_runs_instead(triton_path):
    """Unselected, more than MAX_ROWS rows, N or K not a multiple of 16, a misaligned,
    non-contiguous or other-dtype operand, or autograd recording: torch's GEMM (the kernel
    has no backward; it is compiled for aligned operands)."""
    w = torch.randn(16, 32)
    x = torch.randn(50, 32)
    assert skinny_gemm.takes(x, w)
    assert not skinny_gemm.takes(torch.randn(65, 32), w)
    assert not skinny_gemm.takes(torch.randn(50, 40), torch.randn(16, 40))
    assert not skinny_gemm.takes(x, torch.randn(24, 32))
    assert not skinny_gemm.takes(torch.randn(50 * 32 + 1)[1:].view(50, 32), w)
    assert not skinny_gemm.takes(x.to(F64), w)
    assert not skinny_gemm.takes(torch.randn(32, 50).T, w)
    with torch.enable_grad():
        assert not skinny_gemm.takes(x.requires_grad_(True), w)
    triton_path.setenv(skinny_gemm.ENV_VAR, "torch")
    assert not skinny_gemm.takes(torch.randn(50, 32), w)
    triton_path.delenv(skinny_gemm.ENV_VAR)
    assert not skinny_gemm.takes(torch.randn(50, 32), w)


def test_torch_compile_traces_torch_gemms(triton_path):
    """Under torch.compile (fullgraph) the head traces torch's GEMMs and equals the eager
    head, which runs the kernel."""
    assert_compile_traces_torch_ops(skinny_gemm, "skinny_linear")


def test_settings_are_checked(triton_path):
    triton_path.setenv(skinny_gemm.ENV_VAR, "cublas")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_SKINNY_GEMM: expected one of"):
        skinny_gemm.selected_path()
    triton_path.setenv(skinny_gemm.ENV_VAR, "triton")
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "48")
    with pytest.raises(InvalidArgumentError, match="BLOCK_N: expected one of"):
        skinny_gemm.block_n()
    triton_path.delenv(skinny_gemm.BLOCK_N_VAR)
    assert skinny_gemm.block_n() == skinny_gemm.DEFAULT_BLOCK_N
    for bad in ("0", "65", "two", "-1"):
        triton_path.setenv(skinny_gemm.SPLIT_K_VAR, bad)
        with pytest.raises(InvalidArgumentError, match="SPLIT_K: expected auto or an integer"):
            skinny_gemm.split_k()
    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, " Auto ")
    assert skinny_gemm.split_k() is None
    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, "8")
    assert skinny_gemm.split_k() == 8


def test_head_and_captured_sampler_match_torch(triton_path):
    """float64: the head's forward and input-VJP, and a captured Euler loop with one q|kv
    GEMM (fuse_qkv), with the kernel equal the torch GEMM's to rounding; the kernel ran at
    every projection of every block (4 per block and forward)."""
    head = small_head()
    head.fuse_qkv = True
    # head(), forward_with_vjp(): every block's 4 GEMMs
    assert_path_matches(triton_path, skinny_gemm.ENV_VAR, "triton", "torch", skinny_gemm,
                        "skinny_linear", head, 1e-12, per_block=4)  # fmt: skip


def test_the_step_gemms_and_the_time_mlp_on_the_kernel(triton_path):
    """At B = 1 a step's own GEMMs take the kernel too: action_in, the time MLP's second
    layer and action_out, and its first layer with the step's time half as the bias and
    SiLU in the epilogue (the layer's token half copied contiguous once per call) — no
    SiLU or add kernel; float64, equal to the torch path's steps to rounding. At B = 2 (100
    rows) nothing is copied and torch's ops run."""
    from test_flow_transformer_kernels import _Count  # tests/ is on sys.path

    from ate_fast.models import FlowTransformerHead

    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=1, horizon=6, action_dim=16, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=2, head_dim=8).double()  # fmt: skip
    x, t = torch.randn(1, 6, 16, dtype=F64), torch.rand(3, 1, dtype=F64)
    triton_path.delenv(skinny_gemm.ENV_VAR)
    with torch.no_grad():
        want = [head.forward_features(x, f) for f in head.step_features(x, t)]
        triton_path.setenv(skinny_gemm.ENV_VAR, "triton")
        features = head.step_features(x, t)
        w = features[0].time_weight
        assert w.is_contiguous() and torch.equal(w, head.time_mlp_in.weight[:, :32])
        names = ("skinny_linear", "skinny_linear_act")
        with (
            mock.patch.object(skinny_gemm, names[0], wraps=skinny_gemm.skinny_linear) as lin,
            mock.patch.object(skinny_gemm, names[1], wraps=skinny_gemm.skinny_linear_act) as act,
            _Count() as count,
        ):
            got = [head.forward_features(x, f) for f in features]
        # a step: 3; its block: 5 (q and kv apart: the CPU does not fuse them), o, gate_up, down
        assert act.call_count == 3 and lin.call_count == 3 * (3 + 5)
        assert "silu" not in count.ops
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
        x2 = torch.randn(2, 6, 16, dtype=F64)
        features = head.step_features(x2, t.expand(3, 2))
        assert features[0].time_weight is None
        with _Count() as count:
            head.forward_features(x2, features[0])
        assert count.ops["silu"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_n", skinny_gemm.BLOCK_NS)
@pytest.mark.parametrize("split", ["1", "auto"])
def test_pi0_shapes_on_cuda(triton_path, dtype, block_n, split):
    """π0's four projections at B = 1 (50 rows) on the GPU, against float64: whole K, and
    the auto split (o and down in 8 slices at 32 columns on an H100 / H200)."""
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, str(block_n))
    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    for k, n in [(1024, 2560), (2048, 1024), (1024, 8192), (4096, 1024)]:
        x, w, b, r = _operands(50, k, n, dtype, "cuda")
        _check(skinny_gemm.skinny_linear(x, w, None, r), x, w, None, r, dtype)
        _check(skinny_gemm.skinny_linear(x, w, b), x, w, b, None, dtype)


def test_pdl_is_refused_where_there_is_none(triton_path):
    """``ATE_FAST_TRITON_PDL=on`` where no programmatic dependent launch exists (the CPU
    here; a GPU below compute capability 9.0, e.g. the Orin) raises, naming the setting,
    instead of launching without the wait or ignoring the setting."""
    from ate_fast.ops import pdl_setting, triton_pdl

    assert not triton_pdl.available(torch.device("cpu"))
    assert triton_pdl.launch_options(False) == {}
    assert triton_pdl.launch_options(True) == {"launch_pdl": True}
    triton_path.setenv(pdl_setting.ENV_VAR, "on")
    x, w, _, _ = _operands(50, 256, 32, torch.float32)
    with pytest.raises(InvalidArgumentError, match=r"ATE_FAST_TRITON_PDL=on: .*9\.0.*here: "):
        skinny_gemm.skinny_linear(x, w)
    triton_path.setenv(pdl_setting.ENV_VAR, "maybe")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL: expected one of"):
        pdl_setting.selected()
    triton_path.setenv(pdl_setting.ENV_VAR, "off")
    skinny_gemm.skinny_linear(x, w)  # off: the plain launch


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("split", "in_kernel_sum"), [("1", False), ("auto", False), ("auto", True)]
)
def test_pdl_chain_on_cuda(triton_path, split, in_kernel_sum):
    """π0's four projections back to back (each reads what the one before wrote, o and down
    with the residual), bf16, B = 1, in a CUDA graph replayed 40 times on two inputs in
    turn: launched with programmatic dependent launch the output is bit-equal to the plain
    launches' for each input (a kernel that read before its predecessor ended would see the
    other input's intermediates) — also with the split's slices summed in-kernel on
    counters the graph shares (a launch that counted before its predecessor ended, or left
    a count behind, would sum the wrong slices). Below compute capability 9.0 the setting
    is refused."""
    from ate_fast.ops import pdl_setting, split_counters, triton_pdl

    triton_path.setenv(skinny_gemm.SPLIT_K_VAR, split)
    counters = split_counters.new_buffer(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, device="cuda", generator=g) / shape[-1] ** 0.5).bfloat16()

    inputs = [rand(50, 1024) * 32, rand(50, 1024) * 32]
    weights = [rand(2048, 1024), rand(1024, 2048), rand(8192, 1024), rand(1024, 8192)]

    def chain(x):
        h = skinny_gemm.skinny_linear(x, weights[0])
        c = skinny_gemm.skinny_linear(h, weights[1], None, x)
        d = skinny_gemm.skinny_linear(c, weights[2])
        return skinny_gemm.skinny_linear(d, weights[3], None, c)

    triton_path.setenv(pdl_setting.ENV_VAR, "off")
    plain = [chain(x) for x in inputs]
    triton_path.setenv(pdl_setting.ENV_VAR, "on")
    if not triton_pdl.available(inputs[0].device):
        with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL=on"):
            chain(inputs[0])
        return
    assert all(torch.equal(chain(x), want) for x, want in zip(inputs, plain))
    x = inputs[0].clone()
    graph, out = captured(lambda: chain(x), counters if in_kernel_sum else None)
    for i in range(40):
        x.copy_(inputs[i % 2])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain[i % 2]), f"replay {i}"
    assert not counters.any()


@pytest.mark.cuda
def test_captured_sampler_sums_the_slices_in_kernel_on_cuda(triton_path):
    """π0's expert (2 blocks, bf16, B = 1) in a captured flow Euler loop on the few-row
    GEMM with K split: the capture launches no sum kernel (each tile's last program sums)
    and replays, on two noises in turn, equal to the bit to a capture with
    ``ATE_FAST_SPLIT_REDUCE=kernel``, whose sum kernels did launch."""
    from flow_head_paths import pi0_on_cuda

    from ate_fast.models import skinny_gemm_triton as sgt
    from ate_fast.sampling import FlowSampler

    head, cache, x, _, _ = pi0_on_cuda(2)
    head.eval().requires_grad_(False)
    noises = [x.float(), torch.randn_like(x, dtype=torch.float32)]

    def actions(where: str) -> tuple[list, int]:
        triton_path.setenv("ATE_FAST_SPLIT_REDUCE", where)
        sums = LaunchCounter(sgt._split_sum_kernel)
        with torch.no_grad(), mock.patch.object(sgt, "_split_sum_kernel", sums):
            captured = FlowSampler(head, 3).capture(noises[0], cache, check_finite=False)
            launched = sums.count
        return [captured(noises[i % 2], cache).clone() for i in range(8)], launched

    in_kernel, launched = actions("auto")
    assert launched == 0
    separate, launched = actions("kernel")
    assert launched > 0
    assert not torch.equal(in_kernel[0], in_kernel[1])
    for i, (got, want) in enumerate(zip(in_kernel, separate)):
        assert torch.equal(got, want), f"replay {i}"
