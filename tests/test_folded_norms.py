"""The flow-transformer block's RMSNorms folded into its projections on the Triton path.

With the Triton epilogues running (``ATE_FAST_FLOW_EPILOGUES=triton``; here Triton's CPU
interpreter) and a fused q|kv call (``FlowTransformerHead.fuse_qkv``), the step features
carry ``[W_q; W_kv]`` with the attention norm's weight folded in
(``FlowStepFeatures.attn_norm_folded``) and, with ``fold_mlp_norm``, a copy of
``W_gate_up`` with the MLP norm's (``FlowStepFeatures.gate_up``): those GEMMs take the
un-normed rows and the rotation and gated-GELU kernels scale each row by its norm factor
``1/√(mean(x²) + ε)``, so no kernel computes the folded norms. Checked: the folded call
equals the torch path's (float64, forward and pullback, with and without a padded prefix,
one or both norms folded), stays within bf16's own error, the kernels against their torch
fallbacks, the op count, and where the fold must not happen.
"""

from __future__ import annotations

import pytest
import torch
from test_flow_transformer_kernels import _Count  # tests/ is on sys.path

from ate_fast.models import FlowTransformerHead, block_epilogues
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

ENV = block_epilogues.ENV_VAR
HORIZON = 8


@pytest.fixture
def path(monkeypatch):
    def use(name: str) -> None:
        monkeypatch.setenv(ENV, name)

    return use


def _head(
    dtype=torch.float64, kv_heads: int = 1, fold_mlp_norm: bool = True
) -> FlowTransformerHead:
    """A 2-block small head, fused q|kv on the CPU too, its norm weights not all 1."""
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, num_kv_heads=kv_heads, horizon=HORIZON)
    head.fuse_qkv = True
    head.fold_mlp_norm = fold_mlp_norm
    with torch.no_grad():
        for block in head.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    return head.eval().to(dtype)


def _cond(head: FlowTransformerHead, prefix: str):
    if prefix == "none":
        return None
    tokens = torch.randn(2, 12, head.config.width, dtype=head.action_in.weight.dtype)
    mask = None
    if prefix == "padded":
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 7:] = False
    return head.prefix_cache(tokens, mask)


def _steps(head, path, prefix: str, k: int = 1):
    """Step k of a 3-step call: (forward, forward_with_vjp's output, its pullback at u) with
    the Triton path's features, and the torch path's forward_with_vjp at the same time."""
    dtype = head.action_in.weight.dtype
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, HORIZON, 32, generator=g).to(dtype)
    t = torch.rand(3, 2, generator=g).to(dtype)
    u = torch.randn(2, HORIZON, 32, generator=g).to(dtype)
    cond = _cond(head, prefix)
    with torch.no_grad():
        path("triton")
        features = head.step_features(x, t, cond)
        assert features[k].attn_norm_folded
        assert (features[k].gate_up is not None) == head.fold_mlp_norm
        out, pullback = head.forward_with_vjp_features(x, features[k])
        pulled = pullback(u)  # before the next forward with these features (prefix buffers)
        got = (head.forward_features(x, features[k]), out, pulled)
        path("torch")
        want, want_pullback = head.forward_with_vjp(x, t[k], cond)
        return got, (want, want, want_pullback(u))


@pytest.mark.parametrize("fold_mlp_norm", [True, False], ids=["both", "attention"])
@pytest.mark.parametrize("prefix", ["none", "cache", "padded"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_folded_call_equals_the_torch_path(path, kv_heads, prefix, fold_mlp_norm):
    got, want = _steps(_head(kv_heads=kv_heads, fold_mlp_norm=fold_mlp_norm), path, prefix)
    for name, a, b in zip(("forward", "forward_with_vjp", "pullback"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_folded_bf16_within_bf16_error(path):
    """bf16 (weights and activations), against the float32 head with the same rounded
    weights: the folded Triton call is as close as the torch path's bf16 call (relative L2,
    forward and pullback; the fold rounds W·g once instead of the normed rows)."""
    head = _head(torch.bfloat16)
    got, torch_bf16 = _steps(head, path, "cache")
    exact = _steps(head.float(), path, "cache")[1]
    for a, b, e in zip(got, torch_bf16, exact):
        folded = (a.float() - e).norm() / e.norm()
        plain = (b.float() - e).norm() / e.norm()
        assert folded <= 2 * plain + 2**-8, (float(folded), float(plain))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_kernels_match_their_torch_fallback(path, dtype):
    """The rotation with ``norm`` and ``norm_gated_gelu`` (scale, then the epilogue) on the
    kernels and on the torch ops; the kernel writes the scaled gate | up back in place."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 40, generator=g, dtype=dtype) * 3  # width 40: a partial chunk
    q_lin = torch.randn(2, 5, 4 * 16, generator=g, dtype=dtype)
    kv_lin = torch.randn(2, 5, 2 * 2 * 16, generator=g, dtype=dtype)
    angle = torch.rand(5 + 3, 8, generator=g) * 6
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)
    prefix = tuple(torch.randn(2, 2, 3, 16, generator=g, dtype=dtype) for _ in range(2))
    gate_up = torch.randn(2, 5, 2 * 1100, generator=g, dtype=dtype)  # F = 1100: 2 blocks
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    results = {}
    for name in ("torch", "triton"):
        path(name)
        rotated = block_epilogues.rotate_qkv(q_lin, kv_lin, cos, sin, prefix, 4, 2,
                                             norm=(x, 1e-6))  # fmt: skip
        gu = gate_up.clone()
        gelu = block_epilogues.norm_gated_gelu(gu, x, 1e-6, save_act=True)
        results[name] = (*rotated, *gelu)
        if name == "triton":
            assert gelu[2].data_ptr() == gu.data_ptr()  # written back, in place
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, **tol)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(results["torch"][-1], gate_up * rstd, **tol)


@pytest.mark.parametrize("fold_mlp_norm", [True, False], ids=["both", "attention"])
def test_no_folded_norm_kernel_runs(path, fold_mlp_norm):
    """Per block and step the ATen ops hold no folded norm (pow, mean, rsqrt: the kernels
    apply its factor; the MLP norm's unless it is folded too) and 4 GEMMs: q|kv, o,
    gate_up, down."""
    path("triton")
    counts = []
    for depth in (1, 2):
        torch.manual_seed(0)
        head = FlowTransformerHead("small", depth=depth, horizon=HORIZON).eval()
        head.fuse_qkv, head.fold_mlp_norm = True, fold_mlp_norm
        x, t = torch.randn(1, HORIZON, 32), torch.rand(2, 1)
        with torch.no_grad():
            features = head.step_features(x, t, head.prefix_cache(torch.randn(1, 16, 256)))
            with _Count() as count:
                head.forward_features(x, features[1])
        counts.append(count.ops)
    per_block = counts[1] - counts[0]
    norms = 0 if fold_mlp_norm else 1
    assert all(per_block[op] == norms for op in ("pow", "mean", "rsqrt")), dict(per_block)
    gemms = sum(per_block[n] for n in ("mm", "addmm", "addmm_", "_linear_pointwise"))
    assert gemms == 4, dict(per_block)


@pytest.mark.parametrize("epilogues", ["torch", "triton", "triton-fold-mlp"])
def test_per_call_weight_work(path, epilogues):
    """What a fused call does to the weights, per block: the concatenation (torch
    epilogues); the two multiplies into the stacked tensor (the attention norm folded);
    one more multiply, W_gate_up's copy, only when the MLP norm is folded too."""
    path("torch" if epilogues == "torch" else "triton")
    counts = []
    for depth in (1, 2):
        head = FlowTransformerHead("small", depth=depth, horizon=HORIZON).eval()
        head.fuse_qkv, head.fold_mlp_norm = True, epilogues == "triton-fold-mlp"
        x, t = torch.randn(1, HORIZON, 32), torch.rand(2, 1)
        with torch.no_grad(), _Count() as count:
            head.step_features(x, t)
        counts.append(count.ops)
    want = {
        "torch": {"cat": 1},
        "triton": {"new_empty": 1, "mul": 2},
        "triton-fold-mlp": {"new_empty": 1, "mul": 3},
    }[epilogues]
    assert dict(counts[1] - counts[0]) == want


def test_fold_only_where_the_kernels_run(path):
    """No fold under autograd (the kernels have no backward), with the torch epilogues
    (CUDA's RMSNorm is one kernel: nothing to save) or without a fused q|kv; no MLP norm
    fold by default or for a hooked MLP norm (that call still equals the torch path's)."""
    path("triton")
    head = _head()
    x, t = torch.randn(1, HORIZON, 32, dtype=torch.float64), torch.rand(3, 1, dtype=torch.float64)
    assert head.step_features(x, t)[0].gate_up is None  # autograd: the weights require grad
    with torch.no_grad():
        path("torch")
        assert head.step_features(x, t)[0].gate_up is None
        path("triton")
        assert head.step_features(x, t)[0].gate_up is not None
        head.fold_mlp_norm = False  # the default
        assert head.step_features(x, t)[0].attn_norm_folded
        assert head.step_features(x, t)[0].gate_up is None
        head.fold_mlp_norm = True
        head.fuse_qkv = False
        assert not head.step_features(x, t)[0].attn_norm_folded
        assert head.step_features(x, t)[0].gate_up is None
    head.fuse_qkv = True
    handle = head.blocks[1].mlp_norm.register_forward_hook(lambda m, a, out: out * 2)
    with torch.no_grad():
        features = head.step_features(x, t)
        assert features[0].attn_norm_folded and features[0].gate_up is None
        got = head.forward_features(x, features[1])
        path("torch")
        torch.testing.assert_close(got, head(x, t[1]), rtol=1e-12, atol=1e-12)
    handle.remove()


@pytest.mark.cuda
def test_pi0_folded_on_cuda(path):
    """π0's block sizes in bf16 on the GPU (8 query heads, one kv head of 256, MLP 4096,
    an 816-token prefix, B = 2): a folded call's forward and pullback (the Triton kernels,
    compiled) against the torch path's, each within bf16's error of the other."""
    torch.manual_seed(0)
    head = FlowTransformerHead("pi0-expert", depth=2).to("cuda", torch.bfloat16).eval()
    head.fold_mlp_norm = True
    cache = head.prefix_cache(torch.randn(2, 816, 1024, device="cuda", dtype=torch.bfloat16))
    noise, u = torch.randn(2, 50, 32, device="cuda"), torch.randn(2, 50, 32, device="cuda")
    t = torch.rand(3, 2, device="cuda")
    results = {}
    with torch.no_grad():
        for name in ("torch", "triton"):
            path(name)
            features = head.step_features(noise, t, cache)
            assert (features[1].gate_up is not None) == (name == "triton")
            out, pullback = head.forward_with_vjp_features(noise, features[1])
            results[name] = (out, pullback(u))
    (out, pulled), (ref, ref_pulled) = results["triton"], results["torch"]
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max()
    assert (pulled - ref_pulled).norm() <= 2.5e-2 * ref_pulled.norm()
