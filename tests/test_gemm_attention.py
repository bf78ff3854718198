"""The block's attention as two GEMMs and a softmax (``ATE_FAST_PREFIX_ATTENTION=gemm``,
``ate_fast.models.gemm_attention``; the softmax in torch or in Triton, interpreted on the
CPU): against float64 SDPA, its scores and probabilities on 16-byte rows, inside the head
and its captured sampler, and where SDPA runs instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import (
    assert_compile_traces_torch_ops,
    assert_path_matches,
    prefix_qkv,
)  # tests/ is on sys.path

from ate_fast.models import FlowTransformerHead, block_epilogues, split_kv_attention
from ate_fast.models import gemm_attention as gemm
from ate_fast.models.gemm_alignment import rows_aligned
from ate_fast.ops.backends import MIN_TRITON

ENV = split_kv_attention.ENV_VAR
EPILOGUES = ["torch", "triton"]


@pytest.fixture(params=EPILOGUES)
def epilogues(request, monkeypatch):
    """The softmax's path: torch's ops, or the Triton kernel (the block epilogues')."""
    if request.param == "triton":
        pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv(block_epilogues.ENV_VAR, request.param)
    return request.param


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_sdpa(epilogues, dtype, heads):
    """Against float64 SDPA: float64 to rounding; bf16 no further off than bf16 SDPA is
    (scores and softmax in float32, as flash attention keeps them)."""
    q, k, v = prefix_qkv(2, heads, 24, 90, 32, dtype)
    k = k * 3.0  # logits of a few units: the scores' precision shows
    got = gemm.gemm_attention(q, k, v)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.shape == q.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        sdpa = F.scaled_dot_product_attention(q, k, v).double()
        # Triton's interpreter truncates a bf16 store (a GPU rounds to nearest: the cuda
        # test holds the kernel to 1.5×), twice the probabilities' rounding error
        factor = 2.5 if epilogues == "triton" else 1.5
        assert (got.double() - want).abs().max() <= factor * (sdpa - want).abs().max()
        return
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scores_and_probabilities_take_sixteen_byte_rows(epilogues, dtype):
    """At 90 keys a bf16 row is 180 bytes and a float32 one 360: the scores (float32) and
    the probabilities (the inputs' dtype) come in padded rows, read by the products as they
    are."""
    q, k, _ = prefix_qkv(1, 1, 24, 90, 32, dtype)
    scores = gemm._scores(q[0], k[0], torch.float32)
    assert scores.dtype == torch.float32 and rows_aligned(scores)
    p = gemm._probabilities(scores, 32**-0.5, dtype, q[0], None, 1)
    assert p.dtype == dtype and rows_aligned(p) and p.shape == (1, 24, 90)
    torch.testing.assert_close(p.double().sum(-1), torch.ones(1, 24, dtype=torch.float64),
                               rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)  # fmt: skip


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_a_padded_prefix_mask_is_added_to_the_scores(epilogues, dtype, heads):
    """The head's additive mask for a padded prefix (−∞ on each sample's padding) against
    SDPA with the same mask: the padded keys get no probability."""
    q, k, v = prefix_qkv(2, heads, 24, 90, 32, dtype)
    real = torch.ones(2, 90, dtype=torch.bool)
    real[0, 30:60], real[1, 5:10] = False, False
    mask = torch.where(real, 0.0, float("-inf")).to(dtype)[:, None, None, :]
    out, p = gemm.gemm_attention_saving(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=mask.double())  # fmt: skip
    assert torch.all(p[0, :, :, 30:60] == 0) and torch.all(p[1, :, :, 5:10] == 0)
    if dtype == torch.bfloat16:  # P and the output rounded once each (u = 2⁻⁸): ≤ 2u·max|v|
        assert (out.double() - want).abs().max() <= 2**-7 * v.double().abs().max()
    else:
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_a_masked_prefix_runs_on_the_path_in_the_head(monkeypatch, epilogues):
    """float64, a prefix cache with padding: the head's forward, its input-VJP and a
    captured Euler loop on the gemm path equal SDPA's, and the path ran in every block."""
    from unittest import mock

    from ate_fast.sampling import FlowSampler

    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32,
                               mlp_dim=48, num_heads=4, num_kv_heads=1, head_dim=8)  # fmt: skip
    head = head.double()
    g = torch.Generator().manual_seed(1)
    x, u = (
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    real = torch.tensor([[True] * 5, [True, True, True, False, False]])
    cache = head.prefix_cache(torch.randn(2, 5, 32, generator=g, dtype=torch.float64), mask=real)

    def run():
        with torch.no_grad():
            out, pullback = head.forward_with_vjp(x, t, cache)
            captured = FlowSampler(head, 3).capture(x, cache)
            return head(x, t, cache), out, pullback(u), captured(x, cache)

    monkeypatch.setenv(ENV, "sdpa")
    want = run()
    monkeypatch.setenv(ENV, "gemm")
    with mock.patch.object(
        gemm, "gemm_attention_saving", wraps=gemm.gemm_attention_saving
    ) as entry:
        got = run()
    assert entry.call_count >= 3 * len(head.blocks)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_scores_are_float32_products_of_half_inputs():
    """bf16 inputs: the scores are the float32 products of the (exact) upcast inputs — not
    bf16 products rounded to bf16 and then upcast (4 % off in a probability at a logit
    of 10)."""
    q, k, _ = prefix_qkv(1, 1, 8, 40, 32, torch.bfloat16)
    scores = gemm._scores(q[0], k[0], torch.float32)
    want = q[0].double() @ k[0].double().transpose(-1, -2)
    torch.testing.assert_close(scores.double(), want, rtol=1e-6, atol=1e-5)


def test_head_and_captured_sampler_match_sdpa(monkeypatch, epilogues):
    """float64, one and two key/value heads: the head's forward and input-VJP with a prefix
    cache, and a captured Euler loop, equal SDPA's; the path ran in every block."""
    for kv_heads in (1, 2):
        torch.manual_seed(0)
        head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32,
                                   mlp_dim=48, num_heads=4, num_kv_heads=kv_heads,
                                   head_dim=8).double()  # fmt: skip
        assert_path_matches(monkeypatch, ENV, "gemm", "sdpa", gemm, "gemm_attention", head,
                            1e-12)  # fmt: skip


def test_sdpa_runs_where_the_path_does_not_apply(monkeypatch):
    """A boolean or per-row mask, a recording autograd: SDPA, not the path (the padded
    prefix's additive [B, 1, 1, N] mask: the path)."""
    monkeypatch.setenv(ENV, "gemm")
    q, k, v = prefix_qkv(1, 1, 8, 90, 16, torch.float32)
    assert split_kv_attention.takes(q, k, v, None, "gemm")
    assert split_kv_attention.takes(q, k, v, torch.zeros(1, 1, 1, 90), "gemm")
    for mask in (torch.ones(1, 1, 1, 90, dtype=torch.bool), torch.zeros(1, 1, 8, 90)):
        assert not split_kv_attention.takes(q, k, v, mask, "gemm")
    leaf = q.clone().requires_grad_(True)
    with torch.enable_grad():
        assert not split_kv_attention.takes(leaf, k, v, None, "gemm")


def test_torch_compile_traces_sdpa(monkeypatch):
    """Under ``torch.compile`` the head traces SDPA (the gemm path's ``out=`` writes and
    Triton kernel are not for fake tensors), and the compiled head equals the eager one,
    which runs the path."""
    monkeypatch.setenv(ENV, "gemm")
    assert_compile_traces_torch_ops(gemm, "gemm_attention")


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_pi0_attention_on_cuda(batch):
    """π0's block attention in bf16 (400 rows of one key/value head of 256 against 866
    keys): no further from float64 SDPA than bf16 SDPA is, float32 scores from cuBLAS, no
    unaligned GEMM kernel, and replayed in a CUDA graph to the bit."""
    q, k, v = prefix_qkv(batch, 1, 400, 866, 256, torch.bfloat16, "cuda")
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    sdpa = F.scaled_dot_product_attention(q, k, v).double()
    got = gemm.gemm_attention(q, k, v)
    assert (got.double() - want).abs().max() <= 1.5 * (sdpa - want).abs().max()
    assert gemm.float32_output_gemm()  # the GPU suite's torch: no upcast copies
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gemm.gemm_attention(q, k, v)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    unaligned = sorted({n for n in names if any(f"_align{a}" in n for a in (1, 2, 4))})
    assert names and not unaligned, unaligned
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemm.gemm_attention(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, got, rtol=0, atol=0)
    # openpi's padded prompt: the last 20 of each sample's 48 language tokens hidden
    real = torch.ones(batch, 866, dtype=torch.bool, device="cuda")
    real[:, 816 - 20 : 816] = False  # after 3 × 256 image tokens and 28 real ones
    mask = torch.where(real, 0.0, float("-inf")).to(torch.bfloat16)[:, None, None, :]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=mask.double())  # fmt: skip
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).double()
    got = gemm.gemm_attention(q, k, v, mask)
    assert (got.double() - want).abs().max() <= 1.5 * (sdpa - want).abs().max()


def test_the_pullback_takes_the_forwards_probabilities(monkeypatch, epilogues):
    """With the gemm path the forward keeps its probabilities and the input-VJP (RTC's
    pullback) uses them: no scores product, no softmax recomputed — and the gradient is
    autograd's (float32, one and two key/value heads)."""
    from unittest import mock

    from ate_fast.models import flow_transformer_vjp as vjp

    monkeypatch.setenv(ENV, "gemm")
    for kv_heads in (1, 2):
        torch.manual_seed(0)
        head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32,
                                   mlp_dim=48, num_heads=4, num_kv_heads=kv_heads,
                                   head_dim=8)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        x, u = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
        t, cond = torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32, generator=g)
        cache = head.prefix_cache(cond)
        with torch.no_grad():
            _, pullback = head.forward_with_vjp(x, t, cache)
            with mock.patch.object(vjp, "score_products", side_effect=AssertionError):
                with mock.patch.object(vjp, "softmax_backward", side_effect=AssertionError):
                    got = pullback(u)
        leaf = x.double().requires_grad_(True)
        ref = head.double()
        with torch.enable_grad():
            out = ref(leaf, t.double(), ref.prefix_cache(cond.double()))
            (want,) = torch.autograd.grad(out, leaf, u.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
