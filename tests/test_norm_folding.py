"""``FlowTransformerHead.fold_norm_weights_``: the RMSNorm weights folded into the layers
that read the norms, for inference (``ate_fast.models.norm_folding``).

Checked: the folded head computes the unfolded head's function (float64: forward, the
hand-written pullback, a prefix cache; bf16: within its rounding), on the torch path and
on the Triton path (the CPU interpreter), where the MLP norm then folds for free — the step
features' ``gate_up`` is the layer's own weight (no per-call copy) and no ATen op computes a
norm inside a block; folding twice is folding once; a wrapped or hooked layer is refused
before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_flow_transformer_kernels import _Count  # tests/ is on sys.path
from torch import nn

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import FlowTransformerHead, block_epilogues
from ate_fast.ops.backends import MIN_TRITON

HORIZON = 8


def _head(dtype=torch.float64) -> FlowTransformerHead:
    """A 2-block small head whose norm weights are not all 1 (a dropped weight shows)."""
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, horizon=HORIZON)
    with torch.no_grad():
        for norm in [head.final_norm] + [n for b in head.blocks for n in (b.attn_norm, b.mlp_norm)]:
            norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
    return head.eval().to(dtype)


def _inputs(head: FlowTransformerHead, steps: int = 3):
    dtype = head.action_in.weight.dtype
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, HORIZON, 32, generator=g).to(dtype)
    t = torch.rand(steps, 2, generator=g).to(dtype)
    u = torch.randn(2, HORIZON, 32, generator=g).to(dtype)
    tokens = torch.randn(2, 12, head.config.width, generator=g).to(dtype)
    return x, t, u, tokens


def _outputs(head: FlowTransformerHead, x, t, u, tokens) -> list[torch.Tensor]:
    """forward with conditioning tokens, and forward_with_vjp's output and pullback of a
    3-step call's second step with their prefix cache."""
    with torch.no_grad():
        plain = head(x, t[0], tokens)
        features = head.step_features(x, t, head.prefix_cache(tokens))
        head.forward_features(x, features[0])
        out, pullback = head.forward_with_vjp_features(x, features[1])
        return [plain, out, pullback(u)]


def test_folded_head_is_the_same_function():
    head = _head()
    folded = copy.deepcopy(head).fold_norm_weights_()
    norms = [folded.final_norm] + [n for b in folded.blocks for n in (b.attn_norm, b.mlp_norm)]
    assert all(n.weight is None for n in norms)
    assert len(list(folded.parameters())) == len(list(head.parameters())) - len(norms)
    inputs = _inputs(head)
    for got, want in zip(_outputs(folded, *inputs), _outputs(head, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    folded.fold_norm_weights_()  # nothing left to fold
    assert all(torch.equal(v, before[k]) for k, v in folded.state_dict().items())


def test_bf16_within_its_rounding():
    head = _head()
    inputs = _inputs(head)
    want = _outputs(head, *inputs)
    bf16 = copy.deepcopy(head).to(torch.bfloat16)
    folded = copy.deepcopy(bf16).fold_norm_weights_()
    low = [t.to(torch.bfloat16) for t in inputs]
    for got, unfolded, exact in zip(_outputs(folded, *low), _outputs(bf16, *low), want):
        # the fold's own error is no larger than bf16's error in the unfolded head
        err = (got.double() - exact).abs().max()
        assert err <= 2 * (unfolded.double() - exact).abs().max() + 1e-3, float(err)


@pytest.fixture
def triton_path(monkeypatch):
    pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv(block_epilogues.ENV_VAR, "triton")


def test_triton_path_folds_the_mlp_norm_for_free(triton_path):
    """On the Triton path a folded head's fused call carries W_gate_up itself as the folded
    weight (no copy), runs no norm inside a block, and equals the torch path."""
    head = _head()
    folded = copy.deepcopy(head).fold_norm_weights_()
    x, t, u, tokens = _inputs(head)
    counts = []
    for h in (head, folded):
        h.fuse_qkv = True  # as a GPU call does
        with torch.no_grad():
            features = h.step_features(x, t, h.prefix_cache(tokens))
            with _Count() as count:
                h.forward_features(x, features[0])
        counts.append(count.ops)
    assert features[0].gate_up is not None
    assert all(w is b.gate_up.weight for w, b in zip(features[0].gate_up, folded.blocks))
    assert counts[0]["rsqrt"] == 2 + 1  # the unfolded head: each block's MLP norm, the final
    assert counts[1]["rsqrt"] == 1  # folded: the final norm's only
    setup = []
    for h in (head, folded):  # the call's weight work: [W_q; W_kv] (the norm folded in)
        cache = h.prefix_cache(tokens)
        with torch.no_grad(), _Count() as count:
            h.step_features(x, t, cache)
        setup.append(count.ops)
    # unfolded: W_q and W_kv times the norm's weight into the stacked tensor, per block;
    # folded: their concatenation, and nothing for W_gate_up
    assert setup[0]["mul"] - setup[1]["mul"] == 2 * 2 and setup[1]["cat"] - setup[0]["cat"] == 2
    unfolded = _outputs(head, x, t, u, tokens)
    for got, want in zip(_outputs(folded, x, t, u, tokens), unfolded):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    folded.fold_mlp_norm = False  # never: the weightless norm runs as a layer
    with torch.no_grad():
        assert folded.step_features(x, t, folded.prefix_cache(tokens))[0].gate_up is None


class _LoRA(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.weight = base.weight
        self.delta = nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.delta(x)


@pytest.mark.parametrize("change", ["wrapped", "hooked"])
def test_unplain_layers_are_refused_before_any_change(change):
    head = _head()
    if change == "wrapped":
        head.blocks[1].gate_up = _LoRA(head.blocks[1].gate_up)
        name = "blocks.1.gate_up"
    else:
        head.final_norm.register_forward_hook(lambda m, a, out: out)
        name = "final_norm"
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match=name.replace(".", r"\.")):
        head.fold_norm_weights_()
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert head.blocks[0].attn_norm.weight is not None


@pytest.mark.cuda
def test_cuda_captured_call_runs_no_block_norm():
    """On CUDA (bf16, the Triton path by default): a folded head's captured Euler call
    matches the unfolded head's to bf16 rounding, and a step of it launches one RMSNorm
    kernel per block fewer (the MLP norms': the gated-GELU kernel applies them)."""
    from ate_fast.sampling import FlowSampler

    head = _head(torch.float32).to("cuda", torch.bfloat16)
    folded = copy.deepcopy(head).fold_norm_weights_()
    x = torch.randn(1, HORIZON, 32, device="cuda")
    tokens = torch.randn(1, 24, head.config.width, device="cuda", dtype=torch.bfloat16)
    outs, norms = [], []
    for h in (head, folded):
        cache = h.prefix_cache(tokens)
        with torch.no_grad():
            captured = FlowSampler(h, 4).capture(x, cache)
            outs.append(captured(x, cache).clone())
        norms.append(_norm_kernels_per_step(h, x, cache))
    torch.testing.assert_close(outs[1], outs[0], rtol=3e-2, atol=3e-2)
    assert len(norms[0]) - len(norms[1]) == head.config.depth, norms


def _norm_kernels_per_step(head, x, cache) -> list[str]:
    """The CUDA kernels of a call's second step that compute an RMSNorm (torch's fused
    kernel, or its rsqrt where a torch decomposes it)."""
    from torch.profiler import ProfilerActivity, profile

    t = torch.rand(2, 1, device="cuda")
    with torch.no_grad():
        features = head.step_features(x, t, cache)
        head.forward_features(x, features[0])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            head.forward_features(x, features[1])
            torch.cuda.synchronize()
    pattern = ("layer_norm", "rms_norm", "rsqrt")
    kernels = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
    return [name for name in kernels if any(p in name.lower() for p in pattern)]
