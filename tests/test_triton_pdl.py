"""Programmatic dependent launch of the flow-transformer block's Triton kernels and the
split-key attention's (``ATE_FAST_TRITON_PDL``, ``ate_fast.ops.triton_pdl``): the setting,
refused at every launch site where there is none (the CPU here), and on a Hopper GPU a
captured π0 sampler bit-equal with and without it. That each PDL kernel waits before it
reads is checked on its PTX (``tests/triton_offline_compile.py``)."""

from __future__ import annotations

import pytest
import torch
from flow_head_paths import captured, pi0_on_cuda  # tests/ is on sys.path

from ate_fast.errors import InvalidArgumentError
from ate_fast.ops import pdl_setting
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

ON_CPU = r"ATE_FAST_TRITON_PDL=on: programmatic dependent launch needs .* here: device cpu"


def test_the_setting(monkeypatch):
    monkeypatch.delenv(pdl_setting.ENV_VAR, raising=False)
    assert pdl_setting.selected() is False
    monkeypatch.setenv(pdl_setting.ENV_VAR, " ON ")
    assert pdl_setting.selected() is True
    monkeypatch.setenv(pdl_setting.ENV_VAR, "off")
    assert pdl_setting.selected() is False
    monkeypatch.setenv(pdl_setting.ENV_VAR, "1")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL: expected one of"):
        pdl_setting.selected()


def test_every_launch_site_refuses_it_where_there_is_none(monkeypatch):
    """On the CPU (Triton's interpreter) each launch site — the flow block's forward and
    input-VJP kernels, the attentions', the Transformer encoder's — raises with the setting
    on, naming it (none launches without the wait, none ignores the setting), and runs with
    it off."""
    from ate_fast.models import block_epilogues_triton as fb
    from ate_fast.models import split_kv_attention_triton as sk
    from ate_fast.models.skinny_gemm_triton import skinny_gemm
    from ate_fast.models.split_kv_attention import Tiles

    q_lin, kv_lin = torch.randn(1, 6, 4 * 8), torch.randn(1, 6, 2 * 2 * 8)
    table = torch.randn(6, 8)
    dm, rows = torch.randn(6, 48), torch.randn(6, 32)
    dq, dkv = torch.randn(1, 2, 6 * 2, 8), torch.randn(1, 2, 6, 8)
    q, kv = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 40, 16)
    calls = {
        "gated_gelu": lambda: fb.gated_gelu(torch.randn(6, 2 * 48), False),
        "folded-norm gated_gelu": lambda: fb.gated_gelu(
            torch.randn(6, 2 * 48), False, (torch.randn(6, 32), 1e-6)
        ),
        "rotate_qkv": lambda: fb.rotate_qkv(q_lin, kv_lin, table, table, None, 4, 2),
        "softmax": lambda: fb.softmax(torch.randn(2, 4, 20), 0.5, torch.float32),
        "gelu_gate_backward": lambda: fb.gelu_gate_backward(dm, dm, dm, dm),
        "rms_norm_vjp": lambda: fb.rms_norm_vjp(rows, rows, rows[0], 1e-6, rows),
        "softmax_backward": lambda: fb.softmax_backward(rows, rows, 0.5),
        "softmax_grad": lambda: fb.softmax_grad(rows.softmax(-1), rows, 0.5),
        "unrotate_pack": lambda: fb.unrotate_pack(dq, dkv, dkv, table, table),
        "skinny_gemm": lambda: skinny_gemm(
            torch.randn(5, 64), torch.randn(32, 64), None, None, 16, 2
        ),
        "split_kv_attention (slices)": lambda: sk.split_kv_attention(
            q, kv, kv, Tiles(16, 16, splits=3)
        ),
        "split_kv_attention (one slice)": lambda: sk.split_kv_attention(
            q, kv, kv, Tiles(16, 16, splits=1)
        ),
        "combine_lse": lambda: sk.combine_lse(
            torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5), None, 2
        ),
    }
    calls.update(_more_launches())
    for name, call in calls.items():
        monkeypatch.setenv(pdl_setting.ENV_VAR, "on")
        with pytest.raises(InvalidArgumentError, match=ON_CPU):
            call()
        monkeypatch.setenv(pdl_setting.ENV_VAR, "off")
        assert call() is not None, name  # the plain launch


def _more_launches() -> dict:
    """The Transformer encoder's Triton launch sites (``steer.transformer_triton``), the
    few-row GEMM with its weight read as stored and the persistent MLP, at tiny shapes."""
    from ate_fast.models import fused_mlp
    from ate_fast.models.skinny_gemm_triton import skinny_gemm
    from ate_fast.steer import transformer_triton as tt

    norm = torch.nn.LayerNorm(16)
    x = torch.randn(1, 4, 16)
    stats = tt.add_norm(x, None, norm)[1]  # made with the setting off (unset)
    q = torch.randn(1, 4, 3 * 16)
    att = tt.attention(*q.split(16, dim=-1), 2)[1]
    dqkv = torch.empty(1, 4, 3 * 16)
    return {
        "add_norm": lambda: tt.add_norm(x, x, norm),
        "norm_backward": lambda: tt.norm_backward(x, x, stats, norm.weight),
        "bias_act": lambda: tt.bias_act(x, norm.bias, tt.ACT_GELU),
        "act_backward": lambda: tt.act_backward(x, x, tt.ACT_GELU),
        "attention": lambda: tt.attention(*q.split(16, dim=-1), 2),
        "attention_backward": lambda: (
            tt.attention_backward(x, att, *dqkv.split(16, dim=-1)) or dqkv
        ),
        "fused_mlp": lambda: fused_mlp.fused_mlp_residual(
            torch.randn(5, 32), None, 1e-6, torch.randn(96, 32), torch.randn(32, 48)
        ),
        "skinny_gemm (weight [K, N])": lambda: skinny_gemm(
            torch.randn(5, 64), torch.randn(64, 32), None, None, 16, 2, weight_kn=True
        ),
    }


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("attention", "mlp"), [("gemm", "torch"), ("split_kv", "torch"), ("split_kv", "persistent")]
)
def test_captured_pi0_sampler_is_bit_equal_with_pdl(monkeypatch, attention, mlp):
    """π0's expert (2 blocks, bf16, B = 1) in a captured flow Euler loop with every block
    kernel that has a PDL launch on Triton (the few-row GEMM with its K split, the rotation
    and gated-GELU epilogues, and the gemm attention's softmax or the split-key attention's
    two kernels — with the latter every kernel of a block —, and the persistent MLP on the
    capture's lent counters): with ``ATE_FAST_TRITON_PDL=on``
    its actions equal the plain launches' to the bit, replayed on two noises in turn (a
    kernel reading before its predecessor ended would see the other noise's values). Below
    compute capability 9.0 the capture is refused."""
    from ate_fast.ops import triton_pdl
    from ate_fast.sampling import FlowSampler

    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM", "triton")
    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", attention)
    monkeypatch.setenv("ATE_FAST_FUSED_MLP", mlp)
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", "triton")
    head, cache, x, _, _ = pi0_on_cuda(2)
    head.eval().requires_grad_(False)
    noises = [x.float(), torch.randn_like(x, dtype=torch.float32)]

    def actions(pdl: str) -> list:
        monkeypatch.setenv(pdl_setting.ENV_VAR, pdl)
        with torch.no_grad():
            captured = FlowSampler(head, 3).capture(noises[0], cache, check_finite=False)
            return [captured(noises[i % 2], cache).clone() for i in range(12)]

    plain = actions("off")
    assert not torch.equal(plain[0], plain[1])  # the two noises give two outputs
    if not triton_pdl.available(x.device):
        with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL=on"):
            actions("on")
        return
    for i, got in enumerate(actions("on")):
        assert torch.equal(got, plain[i]), f"replay {i}"


@pytest.mark.cuda
def test_pi0_input_vjp_is_bit_equal_with_pdl(monkeypatch):
    """Real-time chunking's pullback through π0's expert (2 blocks, bf16, B = 1; the
    input-VJP's epilogues and the gemm attention's kept probabilities on Triton): with
    ``ATE_FAST_TRITON_PDL=on`` the forward's output and the pullback of two cotangents,
    each twice in turn, equal the plain launches' to the bit."""
    from ate_fast.ops import triton_pdl

    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", "gemm")
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", "triton")
    head, cache, x, t, u = pi0_on_cuda(2)
    head.eval().requires_grad_(False)
    cotangents = [u, torch.randn_like(u)]

    def run(pdl: str) -> list:
        monkeypatch.setenv(pdl_setting.ENV_VAR, pdl)
        with torch.no_grad():
            out, pullback = head.forward_with_vjp(x, t, cache)
            return [out] + [pullback(cotangents[i % 2]).clone() for i in range(4)]

    plain = run("off")
    if not triton_pdl.available(x.device):
        with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL=on"):
            run("on")
        return
    for i, (got, want) in enumerate(zip(run("on"), plain)):
        assert torch.equal(got, want), f"output {i}"


@pytest.mark.cuda
def test_encoder_gradient_is_bit_equal_with_pdl(monkeypatch):
    """The paper's Transformer encoder (9 layers, bf16, B = 1) on its Triton path with the
    layers' projections on the few-row GEMM (x·Wᵀ forward, x·W backward): every kernel of a
    layer a PDL launch. Its guidance gradient, replayed from a CUDA graph on two samples in
    turn, equals the plain launches' to the bit, and is close to the float64 autograd truth
    (as the torch VJP in bf16, ×1.5)."""
    from ate_fast.align import ActionVAE
    from ate_fast.ops import triton_pdl
    from ate_fast.steer import latent_distance_gradient
    from ate_fast.steer.encoder import FrozenEncoder

    torch.manual_seed(0)
    vae = ActionVAE(32, 50, latent_dim=512, arch="transformer").cuda()
    xs = [torch.randn(1, 50, 32, device="cuda") for _ in range(2)]
    target = torch.randn(512, device="cuda")
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "autograd")
    truth = latent_distance_gradient(FrozenEncoder(vae.double()), xs[0].double(), target.double())
    encoder = FrozenEncoder(vae.to(torch.bfloat16))
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "vjp")
    torch_vjp = latent_distance_gradient(encoder, xs[0], target)
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "triton")
    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM", "triton")

    def replays(pdl: str) -> list:
        monkeypatch.setenv(pdl_setting.ENV_VAR, pdl)
        x = xs[0].clone()
        graph, g = captured(lambda: latent_distance_gradient(encoder, x, target))
        out = []
        for i in range(6):
            x.copy_(xs[i % 2])
            graph.replay()
            torch.cuda.synchronize()
            out.append(g.clone())
        return out

    plain = replays("off")
    assert not torch.equal(plain[0], plain[1])

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(plain[0], truth) < 1.5 * rel(torch_vjp, truth) + 1e-6
    if not triton_pdl.available(xs[0].device):
        with pytest.raises(InvalidArgumentError, match="ATE_FAST_TRITON_PDL=on"):
            replays("on")
        return
    for i, (got, want) in enumerate(zip(replays("on"), plain)):
        assert torch.equal(got, want), f"replay {i}"
