"""A flow-transformer block against a textbook implementation written head by head.

The block (``ate_fast.models.flow_transformer._Block``) lays its tensors out for few kernels
— grouped query heads folded into the rows of their key/value head, rotary tables with the
sign folded in, the prefix's keys and values in front, residual adds inside the GEMMs — and
its hand-written input-VJP reads those layouts back. Every other test compares the block
with itself (autograd through the same ops, the Triton epilogues against the torch ones);
this one checks what it computes against the architecture written out plainly, in float64:
RMSNorm, per query head its key/value head ``n // (heads / kv_heads)``, rotate-half rotary
positions from the angles (prefix tokens 0…L−1, action tokens L…L+H−1), softmax attention
over prefix and actions, the heads concatenated through W_o, the gated tanh-GELU MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ate_fast.models import FlowTransformerHead
from ate_fast.models.block_epilogues import ENV_VAR, PrefixSlot
from ate_fast.models.rotary import rotary_tables
from ate_fast.ops.backends import MIN_TRITON

# (heads, kv_heads, head_dim, prefix L): one kv head (π0), two, one per query head (MHA); no prefix
CASES = [(4, 1, 16, 7), (4, 2, 8, 5), (3, 3, 6, 4), (2, 1, 8, 0)]


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, angle):
    """Rotate-half rotary positions of x [N, hd] at angles [N, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = angle.cos(), angle.sin()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _textbook_block(block, x, tokens, angle):
    """The block on x [B, H, width] after prefix tokens [B, L, width] (or None), head by head."""
    heads, kv_heads, hd = block.num_heads, block.num_kv_heads, block.head_dim
    eps = block.attn_norm.eps
    batch, horizon, _ = x.shape
    length = 0 if tokens is None else tokens.shape[1]
    out = torch.empty_like(x)
    for b in range(batch):
        seq = x[b] if tokens is None else torch.cat([tokens[b], x[b]])  # [L + H, width]
        h = _rms(seq, block.attn_norm.weight, eps)
        q = (h[length:] @ block.q.weight.T).view(horizon, heads, hd)
        kv = (h @ block.kv.weight.T).view(length + horizon, 2 * kv_heads, hd)
        keys, values = kv[:, :kv_heads], kv[:, kv_heads:]
        attn = []
        for n in range(heads):
            j = n // (heads // kv_heads)
            qn = _rotate(q[:, n], angle[length:])
            kn = _rotate(keys[:, j], angle)
            p = torch.softmax(qn @ kn.T / math.sqrt(hd), dim=-1)
            attn.append(p @ values[:, j])
        x1 = x[b] + torch.cat(attn, dim=-1) @ block.o.weight.T
        gate, up = (_rms(x1, block.mlp_norm.weight, eps) @ block.gate_up.weight.T).chunk(2, -1)
        out[b] = x1 + (F.gelu(gate, approximate="tanh") * up) @ block.down.weight.T
    return out


@pytest.mark.parametrize("epilogues", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "q{}kv{}hd{}L{}".format(*c))
def test_block_equals_the_textbook_block(case, epilogues, monkeypatch):
    """Both epilogue paths (block_epilogues: torch ops, or the Triton kernels — through the
    interpreter on the CPU)."""
    if epilogues == "triton":
        pytest.importorskip("triton", minversion=MIN_TRITON)
    monkeypatch.setenv(ENV_VAR, epilogues)
    heads, kv_heads, head_dim, length = case
    torch.manual_seed(0)
    width, horizon, batch = 12, 5, 2
    head = FlowTransformerHead(
        "small", width=width, depth=1, mlp_dim=20, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, horizon=horizon, action_dim=3,
    ).double()  # fmt: skip
    block = head.blocks[0]
    with torch.no_grad():  # norms away from 1, so a swapped norm weight shows
        block.attn_norm.weight.uniform_(0.5, 1.5)
        block.mlp_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(batch, horizon, width, dtype=torch.float64)
    tokens = torch.randn(batch, length, width, dtype=torch.float64) if length else None
    inv = 100.0 ** (-torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))
    angle = torch.arange(length + horizon, dtype=torch.float64)[:, None] * inv
    cos, sin = rotary_tables(angle, torch.float64)
    with torch.no_grad():
        prefix = None if tokens is None else block.prefix_kv(tokens, cos, sin)
        got = block(x, prefix, cos, sin)
        saving, _ = block.forward_saving(x, prefix, cos, sin)
        want = _textbook_block(block, x, tokens, angle)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(saving, got, rtol=0, atol=0)
    if prefix is not None:  # a call's key/value buffers, after another step used them
        slot = PrefixSlot()
        with torch.no_grad():
            block(torch.randn_like(x), prefix, cos, sin, slot)
            torch.testing.assert_close(block(x, prefix, cos, sin, slot), got, rtol=0, atol=0)
