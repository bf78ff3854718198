"""The persistent MLP kernel (``ate_fast.models.fused_mlp``): against float64 and against the
three kernels it replaces, in every storage dtype and with tiles that make many tasks wait
on each other, on the CPU through the Triton interpreter (and on a GPU where there is one);
inside the flow-transformer head and its captured sampler; and where the three kernels must
run instead."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import (  # tests/ is on sys.path
    assert_compile_traces_torch_ops,
    assert_path_matches,
    captured,
    pi0_on_cuda,
    small_head,
)

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import fused_mlp
from ate_fast.models.block_epilogues import fold_norm_weight
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

F64 = torch.float64
# the normwise relative error ‖out − ref‖ / ‖ref‖ against float64, each dtype's bound (the
# measured errors, triton 3.9's interpreter: float64 ≤ 5e-16, float32 ≤ 1.7e-7, bfloat16
# ≤ 0.012, float16 ≤ 3.6e-4): float64 and float32 a few units of their rounding; bf16 and
# fp16 two units of theirs — the kernel rounds g and u, gelu(g), the hidden product and
# the output to the dtype, as the three kernels do. The interpreter converts to bfloat16 by
# truncation (each rounding a whole unit, all towards zero: its bf16 errors are ≈ 4× the
# unfused torch path's on the CPU), so only fp32 / fp16 — and bf16 on a GPU — are also
# held to at most twice the three kernels' error
NORMWISE = {F64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-10}
AS_ACCURATE = (torch.float32, torch.float16)
# tiles under which the small shapes run many tasks: 16 hidden columns per up task, slices
# of 32 (so down tasks wait for 2 up tasks each) and 16 output columns per down task
SMALL = "block_f=16,block_n=16,slice=32"


@pytest.fixture
def persistent(monkeypatch):
    monkeypatch.setenv(fused_mlp.ENV_VAR, "persistent")
    return monkeypatch


def _operands(rows, width, mlp, dtype, device="cpu", seed=0, gain=True):
    g = torch.Generator().manual_seed(seed + rows + width + mlp)

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=F64)).to(device, dtype)

    x = rand(rows, width)
    norm_gain = rand(width, scale=0.2, shift=1.0) if gain else None
    return x, norm_gain, rand(2 * mlp, width, scale=width**-0.5), rand(width, mlp, scale=mlp**-0.5)


def _reference(x, gain, eps, w_gate_up, w_down):
    """The block's MLP with its residual in float64, as the torch modules compute it."""
    x64 = x.to(F64)
    normed = F.rms_norm(x64, (x.shape[-1],), None if gain is None else gain.to(F64), eps)
    gate, up = (normed @ w_gate_up.to(F64).T).chunk(2, dim=-1)
    return x64 + (F.gelu(gate, approximate="tanh") * up) @ w_down.to(F64).T


def _unfused(x, gain, eps, w_gate_up, w_down):
    """The same in ``x``'s dtype, the three-kernel way (torch ops)."""
    normed = F.rms_norm(x, (x.shape[-1],), gain, eps)
    gate, up = F.linear(normed, w_gate_up).chunk(2, dim=-1)
    return x + F.linear(F.gelu(gate, approximate="tanh") * up, w_down)


def _normwise(got, ref):
    return ((got.to(F64) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tiles", ["", SMALL])
@pytest.mark.parametrize(
    ("rows", "width", "mlp", "gain"),
    [(50, 32, 48, True), (1, 48, 80, False), (64, 64, 32, True), (17, 96, 160, True)],
)
def test_kernel_matches_float64(persistent, dtype, tiles, rows, width, mlp, gain):
    """One row to a full row tile, a last slice shorter than the rest (48, 80 hidden
    columns in slices of 32), with the norm's weight and without: within the dtype's bound
    of float64, and (:data:`AS_ACCURATE`) no worse than twice the unfused path's error."""
    persistent.setenv(fused_mlp.TILES_VAR, tiles)
    x, gamma, w_gu, w_down = _operands(rows, width, mlp, dtype, gain=gain)
    got = fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down)
    ref = _reference(x, gamma, 1e-6, w_gu, w_down)
    err = _normwise(got, ref)
    assert got.dtype == dtype and got.shape == x.shape
    assert err <= NORMWISE[dtype], err
    if dtype in AS_ACCURATE:
        assert err <= 2 * _normwise(_unfused(x, gamma, 1e-6, w_gu, w_down), ref), err


def test_folded_norm_weight_and_in_place(persistent):
    """The norm's weight folded into W_gate|up (the block's folded path: no gain) gives the
    unfolded result; in place, the output is x's storage and equals the out-of-place one."""
    persistent.setenv(fused_mlp.TILES_VAR, SMALL)
    x, gamma, w_gu, w_down = _operands(50, 32, 48, F64)
    norm = torch.nn.RMSNorm(32, eps=1e-6, dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(gamma)
    out = fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down)
    folded = fused_mlp.fused_mlp_residual(x, None, 1e-6, fold_norm_weight(w_gu, norm), w_down)
    torch.testing.assert_close(folded, out, rtol=1e-13, atol=1e-13)
    x3 = x.clone().view(2, 25, 32)  # leading dims kept
    in_place = fused_mlp.fused_mlp_residual(x3, gamma, 1e-6, w_gu, w_down, in_place=True)
    assert in_place.data_ptr() == x3.data_ptr() and in_place.shape == (2, 25, 32)
    assert torch.equal(in_place.reshape(50, 32), out)


def test_a_count_that_never_comes_gives_nan_not_a_hang(persistent):
    """The down tasks' wait is bounded: with the ticket started past the up tasks (none of
    them runs, so no slice's count ever comes) and a budget of 3 polls, the launch ends and
    every output element is NaN — what a broken count would show on a GPU, instead of a
    hang."""
    import triton

    import ate_fast.models.fused_mlp_triton as kernels

    persistent.setenv(fused_mlp.TILES_VAR, SMALL)
    x, gamma, w_gu, w_down = _operands(50, 32, 48, torch.float32)
    tiles = fused_mlp.launch_tiles(x.dtype, x)
    up_tasks = triton.cdiv(48, tiles.block_f)
    slices = triton.cdiv(48, tiles.slice)
    sync = torch.zeros(kernels.sync_words(32, 48, tiles), dtype=torch.int32)
    sync[0] = up_tasks
    out = torch.zeros_like(x)
    kernels._fused_mlp_kernel[(2,)](
        x, gamma, w_gu, w_down, torch.zeros(50, 48), torch.empty(slices, 50, 32), out, sync,
        out, out, 50, 32, 48, 1e-6, HAS_GAIN=True, SAVE=False, C=kernels.tl.float32,
        INTERPRETED=True,
        BLOCK_M=tiles.block_m, BLOCK_F=tiles.block_f, BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n, SLICE=tiles.slice, BLOCK_H=tiles.block_h, MAX_POLLS=3,
        RESET=False, PDL=False,
    )  # fmt: skip
    assert bool(out.isnan().all())
    assert sync[1 : 1 + slices].sum() == 0  # no up task ran


@pytest.mark.parametrize("tiles", ["", SMALL])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_lent_counters_are_set_back_to_zero(persistent, tiles, dtype):
    """With counters lent (as a captured graph lends them; no zeroed buffer per call) the
    last program done sets every count back to zero: two launches in turn on the same
    counters, saving and not, each equal to the fresh-buffer launch to the bit (a count
    left over would end the second launch's tasks early or wait for ones that never
    come)."""
    from ate_fast.ops import split_counters

    persistent.setenv(fused_mlp.TILES_VAR, tiles)
    x, gamma, w_gu, w_down = _operands(50, 32, 48, dtype)
    want = fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down)
    want_saved = fused_mlp.fused_mlp_saving(x, gamma, 1e-6, w_gu, w_down)
    counters = split_counters.new_buffer(x.device)
    with split_counters.lend(counters), mock.patch.object(torch, "zeros", None):  # no memset
        got = [fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down) for _ in range(2)]
        saved = fused_mlp.fused_mlp_saving(x, gamma, 1e-6, w_gu, w_down)
    assert all(torch.equal(g, want) for g in got)
    assert all(torch.equal(a, b) for a, b in zip(saved, want_saved))
    assert not counters.any()


@pytest.mark.parametrize("tiles", ["", SMALL])
@pytest.mark.parametrize("fold", [False, True])
def test_head_and_captured_sampler_match_torch(persistent, tiles, fold):
    """float64: the head's forward, its input-VJP (forward_with_vjp: the saving forward and
    the pullback of what it saved) and a captured Euler loop equal the three kernels' to
    rounding, the kernel run once per block and forward; ``fold``: the norms folded into the weights
    (``fold_norm_weights_``) and the Triton epilogues forced, so the block hands the kernel
    the folded W_gate|up."""
    persistent.setenv(fused_mlp.TILES_VAR, tiles)
    head = small_head()
    if fold:
        persistent.setenv("ATE_FAST_FLOW_EPILOGUES", "triton")
        head.fuse_qkv = True
        head.fold_norm_weights_()
    assert_path_matches(persistent, fused_mlp.ENV_VAR, "persistent", "torch", fused_mlp,
                        "_launch", head, 1e-12, per_block=2)  # fmt: skip


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("gain", [True, False])
def test_saving_forward_keeps_what_the_vjp_reads(persistent, dtype, gain):
    """The saving launch's output equals the plain one bit for bit, and its gate | up and
    GELU are the float64 pre-activations n(x)·W_gate|upᵀ and gelu_tanh(gate) to the dtype's
    rounding (their leading dims kept)."""
    persistent.setenv(fused_mlp.TILES_VAR, SMALL)
    x, gamma, w_gu, w_down = _operands(17, 96, 160, dtype, gain=gain)
    x3 = x.view(1, 17, 96)
    out, gu, act = fused_mlp.fused_mlp_saving(x3, gamma, 1e-6, w_gu, w_down)
    assert torch.equal(out, fused_mlp.fused_mlp_residual(x3, gamma, 1e-6, w_gu, w_down))
    assert gu.shape == (1, 17, 320) and act.shape == (1, 17, 160)
    x64 = x.to(F64)
    normed = F.rms_norm(x64, (96,), None if gamma is None else gamma.to(F64), 1e-6)
    ref_gu = normed @ w_gu.to(F64).T
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(gu[0].to(F64), ref_gu, rtol=tol, atol=tol)
    ref_act = F.gelu(gu[0].to(F64)[:, :160], approximate="tanh")
    torch.testing.assert_close(act[0].to(F64), ref_act, rtol=tol, atol=tol)


def test_the_input_vjp_runs_the_saving_launch(persistent):
    """forward_with_vjp (RTC's guidance through the head) runs the saving launch once per
    block, and its pullback equals the three kernels' (float64)."""
    head = small_head()
    x, t = torch.randn(2, 6, 3, dtype=F64), torch.tensor([0.3, 0.8], dtype=F64)
    cond = head.prefix_cache(torch.randn(2, 5, 32, dtype=F64))
    u = torch.randn_like(x)
    with torch.no_grad():
        persistent.setenv(fused_mlp.ENV_VAR, "torch")
        ref_out, ref_pullback = head.forward_with_vjp(x, t, cond)
        ref = ref_pullback(u)
        persistent.setenv(fused_mlp.ENV_VAR, "persistent")
        with mock.patch.object(
            fused_mlp, "fused_mlp_saving", wraps=fused_mlp.fused_mlp_saving
        ) as k:
            out, pullback = head.forward_with_vjp(x, t, cond)
        assert k.call_count == len(head.blocks)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pullback(u), ref, rtol=1e-12, atol=1e-12)


def test_where_the_three_kernels_run_instead(persistent):
    """Unselected, more than MAX_ROWS rows, a width or hidden width not a multiple of 16,
    mismatched shapes, a misaligned, non-contiguous or other-dtype operand, or autograd
    recording: the kernel does not take it."""
    x, gamma, w_gu, w_down = _operands(50, 32, 48, torch.float32)
    assert fused_mlp.takes(x, w_gu, w_down, gamma) and fused_mlp.takes(x, w_gu, w_down)
    assert not fused_mlp.takes(torch.randn(65, 32), w_gu, w_down)
    assert not fused_mlp.takes(torch.randn(50, 40), torch.randn(96, 40), torch.randn(40, 48))
    assert not fused_mlp.takes(x, torch.randn(80, 32), torch.randn(32, 40))
    assert not fused_mlp.takes(x, w_gu, torch.randn(32, 40))
    assert not fused_mlp.takes(torch.randn(50 * 32 + 1)[1:].view(50, 32), w_gu, w_down)
    assert not fused_mlp.takes(x, w_gu, w_down, gamma.to(F64))
    assert not fused_mlp.takes(torch.randn(32, 50).T, w_gu, w_down)
    with torch.enable_grad():
        assert not fused_mlp.takes(x.clone().requires_grad_(True), w_gu, w_down)
    persistent.setenv(fused_mlp.ENV_VAR, "torch")
    assert not fused_mlp.takes(x, w_gu, w_down)
    persistent.delenv(fused_mlp.ENV_VAR)
    assert not fused_mlp.takes(x, w_gu, w_down)


def test_head_keeps_the_three_kernels_for_biases_and_hooks(persistent):
    """A block whose down projection has a bias, or whose MLP norm carries a forward hook,
    runs the three kernels (the kernel adds neither); so does one under autograd."""
    head = small_head()
    x = torch.randn(1, 6, 32, dtype=F64)
    block = head.blocks[0]
    with torch.no_grad():
        assert block._mlp_fuses(x, None)
        block.down.bias = torch.nn.Parameter(torch.zeros(32, dtype=F64))
        assert not block._mlp_fuses(x, None)
        block.down.bias = None
        handle = block.mlp_norm.register_forward_hook(lambda *args: None)
        assert not block._mlp_fuses(x, None)
        handle.remove()
        assert block._mlp_fuses(x, None)
        with mock.patch.object(fused_mlp, "takes", return_value=False):
            assert not block._mlp_fuses(x, None)
    assert not block._mlp_fuses(x, None)  # autograd records: the parameters require grad


def test_settings_are_checked(persistent):
    persistent.setenv(fused_mlp.ENV_VAR, "fused")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_FUSED_MLP: expected one of"):
        fused_mlp.selected_path()
    persistent.setenv(fused_mlp.ENV_VAR, "persistent")
    for bad, match in [
        ("block_f=24", "Tiles.block_f: expected a power of two"),
        ("block_f=64,slice=32", "Tiles.slice: expected at least block_f"),
        ("warps=3", "expected warps a power of two"),
        ("block_q=16", "keys in"),
        ("slice=-1", "whole numbers"),
    ]:
        persistent.setenv(fused_mlp.TILES_VAR, bad)
        with pytest.raises(InvalidArgumentError, match=f"ATE_FAST_FUSED_MLP_TILES: .*{match}"):
            fused_mlp.tiles_from_env()
    persistent.setenv(fused_mlp.TILES_VAR, "slice=1024, stages=3")
    assert fused_mlp.tiles_from_env() == fused_mlp.Tiles(slice=1024, stages=3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tiles", ["", "block_f=64,slice=1024", "block_n=128,stages=3"])
def test_pi0_mlp_on_cuda(persistent, dtype, tiles):
    """π0's MLP (width 1024, hidden 4096) at B = 1 (50 rows) and 1 row on the GPU: within
    the dtype's bound of float64, no worse than twice the three kernels, and the same
    bits on every run (the partials are summed in slice order, whatever order the tasks
    ran in), also replayed from a CUDA graph."""
    persistent.setenv(fused_mlp.TILES_VAR, tiles)
    for rows in (50, 1):
        x, gamma, w_gu, w_down = _operands(rows, 1024, 4096, dtype, "cuda")
        got = fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down)
        ref = _reference(x, gamma, 1e-6, w_gu, w_down)
        assert _normwise(got, ref) <= NORMWISE[dtype]
        unfused = _unfused(x, gamma, 1e-6, w_gu, w_down)
        assert _normwise(got, ref) <= 2 * _normwise(unfused, ref)
        saved = fused_mlp.fused_mlp_saving(x, gamma, 1e-6, w_gu, w_down)
        assert torch.equal(saved[0], got)  # RTC's saving launch: the same output
        graph, static = torch.cuda.CUDAGraph(), x.clone()
        fused_mlp.fused_mlp_residual(static, gamma, 1e-6, w_gu, w_down)  # warm-up compile
        with torch.cuda.graph(graph):
            replayed = fused_mlp.fused_mlp_residual(static, gamma, 1e-6, w_gu, w_down)
        for _ in range(5):
            graph.replay()
            again = fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down)
            torch.cuda.synchronize()
            assert torch.equal(replayed, got) and torch.equal(again, got)


@pytest.mark.cuda
def test_pi0_mlp_on_lent_counters_on_cuda(persistent):
    """π0's MLP (bf16, 50 rows) captured in a CUDA graph on lent counters (no memset: the
    last program done zeroes them), replayed on two inputs in turn: each replay equal to
    the fresh-buffer launch to the bit, the counters zero at the end."""
    from ate_fast.ops import split_counters

    inputs = [_operands(50, 1024, 4096, torch.bfloat16, "cuda", seed=s) for s in (0, 1)]
    gamma, w_gu, w_down = inputs[0][1:]
    want = [fused_mlp.fused_mlp_residual(x, gamma, 1e-6, w_gu, w_down) for x, *_ in inputs]
    static = inputs[0][0].clone()
    counters = split_counters.new_buffer(static.device)
    graph, out = captured(
        lambda: fused_mlp.fused_mlp_residual(static, gamma, 1e-6, w_gu, w_down), counters
    )
    for i in range(6):
        static.copy_(inputs[i % 2][0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want[i % 2]), f"replay {i}"
    assert not counters.any()


@pytest.mark.cuda
def test_pi0_head_on_cuda(persistent):
    """π0's expert (2 blocks, bf16) on the GPU: its forward and its captured Euler loop
    with the kernel, against the three kernels, the kernel run once per block."""
    head, cache, x, t, _ = pi0_on_cuda(2)
    persistent.setenv(fused_mlp.ENV_VAR, "torch")
    with torch.no_grad():
        ref = head(x, t, cache).float()
    persistent.setenv(fused_mlp.ENV_VAR, "persistent")
    with (
        torch.no_grad(),
        mock.patch.object(fused_mlp, "fused_mlp_residual", wraps=fused_mlp.fused_mlp_residual)
        as kernel,
    ):  # fmt: skip
        got = head(x, t, cache).float()
    assert kernel.call_count == 2
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


def test_torch_compile_traces_the_three_kernels(persistent):
    """Under torch.compile (fullgraph) the head traces the three kernels' torch ops and
    equals the eager head, which runs the kernel."""
    assert_compile_traces_torch_ops(fused_mlp, "_launch")
