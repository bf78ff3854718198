"""One GEMM for the flow-transformer block's q and kv projections in a sampler call.

A call of N > 1 steps on a GPU (``FlowTransformerHead.fuse_qkv``; here forced on the CPU)
concatenates each block's ``[W_q; W_kv]`` once (``FlowStepFeatures.qkv``); every step
then projects queries, keys and values in one GEMM and its pullback takes ``[dq | dk | dv]``
back in one. Checked here: the fused call equals the two-GEMM one-step path (float64,
both epilogue paths, one and two kv heads, with and without a padded prefix), the
epilogues read and write column ranges of the fused rows as they do separate tensors (bit
for bit), the fusion stays off where the weights alone are not the layer and on the CPU
by default, and a captured call sees weights changed in place between replays.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from ate_fast.models import FlowTransformerHead, block_epilogues
from ate_fast.models import flow_transformer_vjp as fv
from ate_fast.models.rotary import rotary_tables
from ate_fast.sampling import FlowSampler

ENV = block_epilogues.ENV_VAR
_NO_TRITON = importlib.util.find_spec("triton") is None
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(_NO_TRITON, reason="no triton"))]


HORIZON = 8  # action tokens: few, for Triton's interpreter (one program per row)


def _head(kv_heads: int, dtype=torch.float64) -> FlowTransformerHead:
    """A 2-block small head that fuses on the CPU too (auto: only off the CPU)."""
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, num_kv_heads=kv_heads, horizon=HORIZON)
    head.fuse_qkv = True
    return head.eval().to(dtype)


def _cond(head: FlowTransformerHead, prefix: str, batch: int):
    if prefix == "none":
        return None
    tokens = torch.randn(batch, 12, head.config.width, dtype=torch.float64)
    mask = None
    if prefix == "padded":  # sample 1's last 5 tokens are padding
        mask = torch.ones(batch, 12, dtype=torch.bool)
        mask[1, 7:] = False
    return head.prefix_cache(tokens, mask)


@pytest.mark.parametrize("prefix", ["none", "cache", "padded"])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_call_features_equal_the_one_step_path(monkeypatch, path, kv_heads, prefix):
    """Each step of a 2-step call (one q|kv GEMM) against ``forward`` / ``forward_with_vjp``
    at that step's time (two GEMMs), float64: the forward and the pullback (the second step
    reuses the call's buffers the first wrote)."""
    monkeypatch.setenv(ENV, path)
    head = _head(kv_heads)
    batch = 2
    x = torch.randn(batch, HORIZON, 32, dtype=torch.float64)
    t = torch.rand(2, batch, dtype=torch.float64)
    cond = _cond(head, prefix, batch)
    with torch.no_grad():
        features = head.step_features(x, t, cond)
        assert all(f.qkv is not None for f in features)
        assert features[0].qkv[0].shape == (
            (head.config.num_heads + 2 * kv_heads) * head.config.head_dim, head.config.width
        )  # fmt: skip
        for k, f in enumerate(features):
            u = torch.randn(batch, HORIZON, 32, dtype=torch.float64)
            want, want_pullback = head.forward_with_vjp(x, t[k], cond)
            out, pullback = head.forward_with_vjp_features(x, f)
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            # (the pullback before the next forward with f: they share the prefix buffers)
            torch.testing.assert_close(pullback(u), want_pullback(u), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(head.forward_features(x, f), want, rtol=1e-12, atol=1e-12)


def _tables(length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(length, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2)
    return rotary_tables(angle, torch.float32)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("path", PATHS)
def test_epilogues_read_and_write_column_ranges(monkeypatch, path, kv_heads):
    """``rotate_qkv`` on q and kv as column ranges of one fused output, and
    ``unrotate_pack_qkv`` into one fused gradient, equal the same on separate contiguous
    tensors bit for bit (float32)."""
    monkeypatch.setenv(ENV, path)
    batch, horizon, prefix, heads, hd = 2, 5, 7, 4, 16
    g = torch.Generator().manual_seed(1)
    fused = torch.randn(batch, horizon, (heads + 2 * kv_heads) * hd, generator=g)
    q_lin, kv_lin = fused.split([heads * hd, 2 * kv_heads * hd], dim=-1)
    assert not q_lin.is_contiguous() and not kv_lin.is_contiguous()
    keys = torch.randn(batch, kv_heads, prefix, hd, generator=g)
    values = torch.randn(batch, kv_heads, prefix, hd, generator=g)
    cos, sin = _tables(prefix + horizon, hd)
    got = block_epilogues.rotate_qkv(q_lin, kv_lin, cos, sin, (keys, values), heads, kv_heads)
    want = block_epilogues.rotate_qkv(q_lin.contiguous(), kv_lin.contiguous(), cos, sin,
                                      (keys, values), heads, kv_heads)  # fmt: skip
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    dq = torch.randn(batch, kv_heads, horizon * heads // kv_heads, hd, generator=g)
    dk, dv = (torch.randn(batch, kv_heads, horizon, hd, generator=g) for _ in range(2))
    packed = fv.unrotate_pack_qkv(dq, dk, dv, cos, sin)
    assert packed.shape == fused.shape and packed.is_contiguous()
    assert torch.equal(packed, torch.cat(fv.unrotate_pack(dq, dk, dv, cos, sin), dim=-1))


def test_auto_fuses_off_the_cpu_only():
    """``fuse_qkv = None`` (the default): a CPU call keeps the two GEMMs (no launch to save;
    the concatenation would cost more than it gains), any other device fuses (the meta
    device stands in for a GPU: shapes only)."""
    head = FlowTransformerHead("small", depth=2)
    assert head.fuse_qkv is None
    x, t = torch.randn(1, 50, 32), torch.rand(3, 1)
    assert head.step_features(x, t)[0].qkv is None
    meta = head.to("meta")
    features = meta.step_features(x.to("meta"), t.to("meta"))
    width = (head.config.num_heads + 2 * head.config.num_kv_heads) * head.config.head_dim
    assert [w.shape for w in features[0].qkv] == [(width, head.config.width)] * 2
    meta.fuse_qkv = False
    assert meta.step_features(x.to("meta"), t.to("meta"))[0].qkv is None


class _Scaled(nn.Linear):
    """A wrapper whose output is not ``F.linear(x, weight)`` (as a LoRA adapter's is not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_fusion_only_where_the_weights_are_the_layer():
    """No fused weight for one step (it would read both weights twice), nor when a q or kv
    layer is a subclass, hooked, or has a bias; those calls still equal the layers'."""
    head = _head(1)
    x, t = torch.randn(1, HORIZON, 32, dtype=torch.float64), torch.rand(3, 1, dtype=torch.float64)
    assert head.step_features(x, t[:1])[0].qkv is None
    assert head.step_features(x, t)[0].qkv is not None

    def adapted(change):
        other = _head(1)  # fuse_qkv True
        change(other.blocks[1])
        return other

    def subclass(block):
        layer = _Scaled(block.q.in_features, block.q.out_features, bias=False)
        layer.load_state_dict(block.q.state_dict())
        block.q = layer.double()

    def hooked(block):
        block.kv.register_forward_hook(lambda module, args, out: out * 0.5)

    def with_bias(block):
        layer = nn.Linear(block.kv.in_features, block.kv.out_features).double()
        block.kv = layer

    for change in (subclass, hooked, with_bias):
        other = adapted(change)
        with torch.no_grad():
            features = other.step_features(x, t)
            assert features[0].qkv is None, change.__name__
            torch.testing.assert_close(other.forward_features(x, features[1]),
                                       other(x, t[1]), rtol=1e-12, atol=1e-12)  # fmt: skip


def test_capture_sees_weights_changed_in_place():
    """The concatenation is part of each call: a captured sampler replayed after an in-place
    update of W_q and W_kv (an optimizer step) gives the updated head's actions."""
    head = _head(1, torch.float32)
    noise = torch.randn(1, HORIZON, 32)
    sampler = FlowSampler(head, 4)
    with torch.no_grad():
        run = sampler.capture(noise)
        before = run(noise).clone()  # (the replay's output buffer is reused)
        for block in head.blocks:
            block.q.weight.mul_(1.5)
            block.kv.weight.add_(0.01)
        after = run(noise)
        want = sampler.sample(noise)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_pi0_call_on_cuda_fuses_by_default(dtype):
    """On the GPU a sampler call fuses by default (auto); π0's block sizes (8 query heads,
    one kv head of 256, an 816-token prefix, B = 2): the captured call and a step's
    pullback against the two-GEMM path, within the dtype's rounding."""
    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=2).to("cuda", dtype).eval()
    two = copy.copy(head)  # the same modules and weights, its own setting
    two.fuse_qkv = False
    cache = head.prefix_cache(torch.randn(2, 816, 1024, device="cuda", dtype=dtype))
    noise = torch.randn(2, 50, 32, device="cuda")
    t = torch.rand(3, 2, device="cuda")
    assert head.step_features(noise, t, cache)[0].qkv is not None
    assert two.step_features(noise, t, cache)[0].qkv is None
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        got = FlowSampler(head, 10).capture(noise, cache)(noise, cache).clone()
        want = FlowSampler(two, 10).capture(noise, cache)(noise, cache)
        assert (got - want).abs().max() <= bound * want.abs().max()
        u = torch.randn(2, 50, 32, device="cuda")
        pulled = []
        for model in (head, two):
            features = model.step_features(noise, t, cache)
            pulled.append(model.forward_with_vjp_features(noise, features[1])[1](u))
    assert (pulled[0] - pulled[1]).norm() <= bound * pulled[1].norm()
