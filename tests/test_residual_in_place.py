"""The flow transformer's residual stream, accumulated in place by its residual GEMMs.

ATen's out-of-place ``addmm(C, A, B)`` first copies C into a new output and then runs the
GEMM with β = 1; on CUDA that copy is a device-to-device memcpy per call — two per block
and step of π0's expert (the o and down projections), 36 of the 239 kernels of a step in
the H200 profile of 2026-12-04. Where nothing reads the residual again, the head runs
``C.addmm_(A, B)`` instead: the same GEMM, no copy. Checked here: the in-place path is
taken exactly where it may be (the head's own tokens, no pullback saving them, no autograd
record, no hook anywhere in the head), its results equal the out-of-place ones bit for
bit, and — on CUDA — a step copies nothing.
"""

from __future__ import annotations

import pytest
import torch
from op_counts import OpCounter  # tests/ is on sys.path

from ate_fast.models import make_head
from ate_fast.models.cpu_gemm import linear_residual_rows


def _head(depth: int = 2, dtype: torch.dtype = torch.float64):
    """A small flow transformer with a prefix cache, and two steps' features; float64 on
    the CPU: oneDNN does not take it, so the residual GEMMs are ATen's addmm. Also the
    function that takes the features again (after a change to the head)."""
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=depth).eval().to(dtype)
    head.fuse_qkv = True  # as a GPU call does
    x = torch.randn(2, 50, 32, dtype=dtype)
    cache = head.prefix_cache(torch.randn(2, 24, head.config.width, dtype=dtype))
    t = torch.rand(2, 2, dtype=dtype)

    def features():
        return head.step_features(x, t, cache)

    return head, x, features(), features


def test_rows_in_place_only_where_allowed():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    residual = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    want = residual + x @ weight.t()
    kept = residual.clone()
    out = linear_residual_rows(x, weight, kept.clone())  # not asked: a new tensor
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    got = linear_residual_rows(x, weight, residual, in_place=True)
    assert got is residual  # accumulated into it
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    # not where autograd records (the residual is needed by the graph) ...
    leaf = kept.clone().requires_grad_(True)
    with torch.enable_grad():
        out = linear_residual_rows(x, weight, leaf, in_place=True)
    assert out is not leaf and torch.equal(leaf.detach(), kept)
    # ... nor into a strided residual (no row view of it)
    strided = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).transpose(1, 2)
    before = strided.clone()
    out = linear_residual_rows(x, weight, strided, in_place=True)
    assert out is not strided and torch.equal(strided, before)
    torch.testing.assert_close(out, before + x @ weight.t(), rtol=1e-14, atol=1e-14)


def test_step_accumulates_in_place_and_is_exact():
    """A step's residual GEMMs run in place (two per block, no out-of-place addmm with a
    residual) and give the out-of-place result exactly; a pullback's forward saves its
    residuals, so it runs them out of place, with the same output."""
    head, x, (first, second), _ = _head()
    with torch.no_grad():
        head.forward_features(x, first)  # writes the prefix into the call's buffers
        with OpCounter() as ops:
            got = head.forward_features(x, second)
        saving, _ = head.forward_with_vjp_features(x, second)
    assert ops.ops["addmm_"] == 2 * head.config.depth, dict(ops.ops)
    with OpCounter() as saved_ops, torch.no_grad():
        head.forward_with_vjp_features(x, second)
    assert "addmm_" not in saved_ops.ops
    torch.testing.assert_close(saving, got, rtol=0, atol=0)
    # the reference: autograd records (the weights require grad), so nothing runs in place
    with torch.enable_grad():
        want = head.forward_features(x, second)
    assert want.requires_grad
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["block", "mlp_norm", "time_mlp_out"])
def test_a_hook_anywhere_keeps_every_residual(where):
    """A forward hook may keep a reference to what it is given or returns (an activation
    recorder): with one anywhere in the head, the step's features say so (``plain``
    False) and nothing runs in place, so what the hook kept is what it saw; the output is
    the same."""
    head, x, (first, _), features_of = _head(depth=3)
    with torch.no_grad():
        want = head.forward_features(x, first).clone()
    module = {"block": head.blocks[1], "mlp_norm": head.blocks[1].mlp_norm,
              "time_mlp_out": head.time_mlp_out}[where]  # fmt: skip
    kept, snapshots = [], []

    def record(m, args, out):  # the block's input, the norm's input, the embedding's output
        tensor = out if where == "time_mlp_out" else args[0]
        kept.append(tensor)
        snapshots.append(tensor.clone())

    module.register_forward_hook(record)
    with torch.no_grad():
        first = features_of()[0]
        assert not first.plain
        with OpCounter() as ops:
            got = head.forward_features(x, first)
    assert "addmm_" not in ops.ops, dict(ops.ops)
    assert kept and all(torch.equal(k, s) for k, s in zip(kept, snapshots))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_step_copies_nothing():
    """On CUDA, a steady-state bf16 step of a prefix-conditioned head launches no
    device-to-device memcpy (the copies ATen's addmm made of each residual are gone)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=3).eval().to("cuda", torch.bfloat16)
    x = torch.randn(1, 50, 32, device="cuda", dtype=torch.bfloat16)
    cache = head.prefix_cache(torch.randn(1, 64, head.config.width, device="cuda"))
    t = torch.rand(2, 1, device="cuda")
    first, second = head.step_features(x, t, cache)
    with torch.no_grad():
        head.forward_features(x, first)
        head.forward_features(x, second)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            head.forward_features(x, second)
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert names, "the profiler saw no CUDA activity"
    copies = [n for n in names if "memcpy" in n.lower() and "dtod" in n.lower()]
    assert not copies, copies
