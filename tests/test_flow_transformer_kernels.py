"""How many kernels one flow-transformer block launches per step.

A captured flow-transformer step on the GPU is bound by its kernel count, not by its
weights (the H100 run: the small flow transformer's captured step took ≈ 110 µs per block
for ≈ 2 MB of float32 weights, ≈ 30 kernels of a few µs each), so the block's op count is
a performance property worth a test. Counted here: the ATen compute ops a block dispatches
(views and metadata ops excluded), on the CPU — on the GPU each is one kernel, except
that torch's CPU ``rms_norm`` decomposes into 6 ops (8 in bf16, with its casts) where CUDA
has one fused kernel.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from flow_head_paths import interpreted_launches  # tests/ is on sys.path
from torch.utils._python_dispatch import TorchDispatchMode

from ate_fast.models import make_head
from ate_fast.models.rotary import rotary_tables, rotate
from ate_fast.ops.backends import MIN_TRITON

# ops that only make views or change metadata: no kernel
_NO_KERNEL = {
    "view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze",
    "squeeze", "permute", "split", "split_with_sizes", "chunk", "as_strided", "alias",
    "detach", "unbind", "_reshape_alias", "reshape", "lift_fresh", "empty", "empty_strided",
}  # fmt: skip
# per step and block, 64 prefix tokens, one kv head (both reference configs): 2 × 6 for the
# CPU RMSNorms (+ 2 × 2 casts to float32 and back in bf16), the q|kv and gate_up GEMMs, 3
# per rotation (q; k, written into the call's key/value buffer), the values' copy into it,
# attention, 2 GEMMs with their residual add (in place), GELU and the gate product. Were 39 / 43
# before the rotation went 7 → 3 ops and the residual adds into the GEMMs, 29 / 33 before
# the queries were folded token-major (attention's output was copied into the o
# projection's layout), 28 / 32 before the prefix stayed in the call's buffers (two
# concatenations per step: the keys and the values), 27 / 31 before q and kv were
# projected by one GEMM (FlowStepFeatures.qkv: a call of N > 1 steps on a GPU; forced on
# here, the CPU's default keeps the two GEMMs).
BLOCK_OPS = {torch.float32: 26, torch.bfloat16: 30}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_forward(depth: int, dtype: torch.dtype) -> tuple[collections.Counter, ...]:
    """The ops of a call's first step (it writes the prefix into the call's key/value
    buffers) and of a later step, which is what each step of a sampler costs."""
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=depth).eval().to(dtype)
    head.fuse_qkv = True  # as a GPU call does (the CPU's default keeps q and kv apart)
    x, t = torch.randn(1, 50, 32), torch.rand(2, 1)
    cache = head.prefix_cache(torch.randn(1, 64, head.config.width))
    first, second = head.step_features(x, t, cache)
    counts = []
    for features in (first, second):
        with torch.no_grad(), _Count() as count:
            head.forward_features(x, features)
        counts.append(count.ops)
    return tuple(counts)


@pytest.mark.parametrize("gemm", ["aten", "onednn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_per_block(monkeypatch, dtype, gemm):
    monkeypatch.setenv("ATE_FAST_CPU_GEMM", gemm)  # cpu_gemm: oneDNN takes float32 only
    # the torch ops (what a GPU without the Triton epilogues launches), not the CPU's
    # default native gated GELU (one kernel where the torch ops run two)
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", "torch")
    (first1, one), (first2, two) = _ops_of_forward(1, dtype), _ops_of_forward(2, dtype)
    per_block = two - one
    assert sum(per_block.values()) == BLOCK_OPS[dtype], dict(per_block)
    # the call's first step also writes the prefix's keys and values into the buffers
    assert (first2 - first1) - per_block == collections.Counter(new_empty=2, copy_=2)
    assert per_block["cat"] == 2  # the rotations' swaps only: no prefix concatenation
    assert "add" not in per_block  # the residuals ride in the output projections' GEMMs
    if gemm == "onednn" and dtype == torch.float32:  # the 4 GEMMs, 2 with the residual
        assert per_block["_linear_pointwise"] == 4 and "addmm" not in per_block
    else:  # the residual GEMMs accumulate into the residual stream in place: ATen's
        # out-of-place addmm would first copy C into a new output (a memcpy on CUDA)
        assert per_block["addmm_"] == 2 and "_linear_pointwise" not in per_block
        assert "addmm" not in per_block
        assert per_block["mm"] == 2  # q|kv (one GEMM) and gate_up
    assert per_block["addcmul"] == 2
    assert "clone" not in per_block  # one kv head: attention's output is W_o's input as is


def test_rotation_is_three_ops_and_exact():
    """The rotate-half rotation through the signed tables equals the textbook formula
    (float64: to the last bit but one) in three ops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=gen, dtype=torch.float64)
    angle = torch.rand(7, 8, generator=gen) * 6.0
    cos, sin = rotary_tables(angle, torch.float64)
    with _Count() as count:
        got = rotate(x, cos, sin)
    assert sum(count.ops.values()) == 3, dict(count.ops)
    c, s = angle.cos().double(), angle.sin().double()
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    assert got.is_contiguous()  # the grouped-query fold of the queries stays a view


# the input-VJP per block (RTC's pullback), float32: 5 GEMMs, 5 batched GEMMs and the
# softmax, and 41 element-wise / row / layout ops with the torch epilogues (the RMSNorm
# VJPs, the rotation's transpose and the packing, the softmax backward, the gated GELU's);
# with ATE_FAST_FLOW_EPILOGUES=triton those 41 + the softmax are 5 Triton kernels and the
# 10 GEMMs remain. Were 55 / 11 before the queries were folded token-major (with one kv
# head the attention output's gradient and dq are then in the projections' layouts: two
# layout copies fewer), 53 before [dk | dv] was concatenated in the projection's layout
# (it was concatenated per head, then copied into it).
VJP_BLOCK_OPS = {"torch": 52, "triton": 10}
# a sampler call's features (N > 1 steps) project q and kv in one GEMM: the pullback then
# packs [dq | dk | dv] for one GEMM back, not two (torch: its packing is the one
# concatenation the unfused path needs for [dk | dv])
VJP_BLOCK_OPS_FUSED = {"torch": 51, "triton": 9}
# what Triton's interpreter dispatches around a launch (copies to and from its host arrays)
_INTERPRETER_OPS = {"set_", "copy_", "new_empty", "empty_like", "promote_types"}


def _ops_of_vjp(depth: int, steps: int) -> collections.Counter:
    """The ops of one pullback, from features of a call of ``steps`` steps."""
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=depth).eval()
    head.fuse_qkv = True  # as a GPU call does (a one-step call never fuses)
    x, t = torch.randn(1, 50, 32), torch.rand(steps, 1)
    cache = head.prefix_cache(torch.randn(1, 64, head.config.width))
    with torch.no_grad():
        features = head.step_features(x, t, cache)
        assert (features[0].qkv is not None) == (steps > 1)
        out, pullback = head.forward_with_vjp_features(x, features[0])
        u = torch.randn_like(out)
        with _Count() as count:
            pullback(u)
    return count.ops


@pytest.mark.parametrize("steps", [1, 2], ids=["one-step", "call"])
@pytest.mark.parametrize("gemm", ["aten", "onednn"])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_vjp_ops_per_block(monkeypatch, path, gemm, steps):
    if path == "triton":
        pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", path)
    monkeypatch.setenv("ATE_FAST_CPU_GEMM", gemm)
    per_block = _ops_of_vjp(2, steps) - _ops_of_vjp(1, steps)
    for name in _INTERPRETER_OPS:
        per_block.pop(name, None)
    want = (VJP_BLOCK_OPS if steps == 1 else VJP_BLOCK_OPS_FUSED)[path]
    assert sum(per_block.values()) == want, dict(per_block)
    gemms = 5 if steps == 1 else 4
    if gemm == "onednn":  # one step: dq·W_q is the kv gradient's residual
        assert per_block["_linear_pointwise"] == gemms and "addmm" not in per_block
    elif steps == 1:  # dq·W_q rides in the kv gradient's GEMM as its C, accumulated into
        assert per_block["addmm_"] == 1 and "addmm" not in per_block
    else:
        assert not {"addmm", "addmm_"} & set(per_block)  # [dq | dk | dv]·[W_q; W_kv]: one GEMM


# allocations: no kernel
_ALLOCATIONS = {"new_empty", "empty_like", "empty", "new_empty_strided"}


def _triton_block_launches(monkeypatch, lend: bool) -> tuple[collections.Counter, ...]:
    """``(ATen compute ops, Triton launches)`` per block and step of the small head in bf16
    with every block path on Triton — the few-row GEMM, the split-key attention, the
    persistent MLP, the Triton epilogues — counters lent (as a captured graph lends them)
    or not: the difference of a 2-block and a 1-block forward."""
    from ate_fast.ops import split_counters

    for var, path in (("ATE_FAST_FLOW_EPILOGUES", "triton"), ("ATE_FAST_SKINNY_GEMM", "triton"),
                      ("ATE_FAST_SKINNY_GEMM_SPLIT_K", "2"),  # split, as π0's o and q|kv are
                      ("ATE_FAST_PREFIX_ATTENTION", "split_kv"),
                      ("ATE_FAST_FUSED_MLP", "persistent")):  # fmt: skip
        monkeypatch.setenv(var, path)
    counts = []
    for depth in (1, 2):
        torch.manual_seed(0)
        head = make_head("flow-transformer", "small", depth=depth).eval().to(torch.bfloat16)
        head.fuse_qkv = True  # as a GPU call does
        x, t = torch.randn(1, 50, 32), torch.rand(2, 1)
        with torch.no_grad():
            first, second = head.step_features(x, t, head.prefix_cache(torch.randn(1, 64, 256)))
            lent = split_counters.lend(split_counters.new_buffer(x.device))
            with lent if lend else contextlib.nullcontext():
                head.forward_features(x, first)  # writes the prefix into the call's buffers
                with interpreted_launches() as launches, _Count() as count:
                    head.forward_features(x, second)
        counts.append((count.ops, collections.Counter(launches)))
    (ops1, launches1), (ops2, launches2) = counts
    return ops2 - ops1, launches2 - launches1


def test_the_triton_block_is_five_launches(monkeypatch):
    """With every block path on Triton, a captured step's block is five kernels — the q|kv
    and o GEMMs (K split), the rotation, the attention (keys split), the MLP (both norms
    inside kernels) — and no ATen kernel; each a PDL launch on Hopper
    (``ATE_FAST_TRITON_PDL``). Without lent counters (an eager call) the split GEMMs' sums,
    the attention's combine and the MLP's memset come back."""
    pytest.importorskip("triton", minversion=MIN_TRITON)
    ops, launches = _triton_block_launches(monkeypatch, lend=True)
    assert set(ops) <= _ALLOCATIONS, dict(ops)
    expected = {"_skinny_gemm_kernel": 2, "_rotate_qkv_kernel": 1, "_partial_kernel": 1,
                "_fused_mlp_kernel": 1}  # fmt: skip
    assert dict(launches) == expected
    ops, launches = _triton_block_launches(monkeypatch, lend=False)
    assert dict(launches) == {**expected, "_split_sum_kernel": 2, "_combine_kernel": 1}
    kernels = {op: n for op, n in ops.items() if op not in _ALLOCATIONS}
    assert kernels == {"zeros": 1}  # the MLP's counters zeroed (a memset on CUDA)
