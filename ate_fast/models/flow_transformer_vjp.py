"""The input-VJP of :class:`~ate_fast.models.FlowTransformerHead`, written in forward ops.

``head_input_vjp`` computes ``(∂out/∂x)ᵀ u`` for the head's output ``out`` [B, H, D] at
its input ``x`` [B, H, D] from what the forward kept (``FlowTransformerHead.forward_with_vjp``
runs that forward: the module's own ops, so its output is ``forward``'s bit for bit). Only
the input gradient is formed — never a weight's — and without an autograd tape, so the
same code runs eagerly, in a CUDA graph, under ``inference_mode`` and in an exported ONNX
graph. Per block (pre-norm, as π0's action expert), backwards:

* gated-GELU MLP: ``dm = g·W_down``, ``d gate = gelu′(gate)·dm·up``, ``d up = dm·gelu(gate)``,
  through ``W_gate_up`` and the RMSNorm;
* attention: the softmax probabilities are recomputed from the saved rotated q and k
  (``F.scaled_dot_product_attention`` does not return them; at H = 50 the recompute is a
  small fraction of the block), ``dS = P ⊙ (dP − rowsum(dP ⊙ P))``; grouped query heads
  share their key/value head, so their key/value gradients add up; only the H action rows
  of K and V depend on x (the L conditioning tokens are constants), so only those are
  formed; the rotary positions are undone by the inverse rotation;
* RMSNorm: ``dx = r·(g·w − x̂·mean(g·w·x̂))`` with ``r = 1/√(mean(x²) + ε)``, ``x̂ = x·r``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ate_fast.models.rotary import swap_halves


class BlockSaved(NamedTuple):
    """What a block's forward keeps for its input-VJP (x [B, H, width], L conditioning
    tokens, N = L + H)."""

    x: Tensor  # the block's input [B, H, width]
    q: Tensor  # rotated queries [B, heads, H, hd]
    k: Tensor  # rotated keys [B, kv_heads, N, hd] (before sharing across query heads)
    v: Tensor  # values [B, kv_heads, N, hd]
    x1: Tensor  # after the attention residual [B, H, width]
    gate: Tensor  # [B, H, mlp_dim]
    up: Tensor  # [B, H, mlp_dim]
    act: Tensor  # gelu_tanh(gate) [B, H, mlp_dim]


def rms_norm_input_vjp(grad: Tensor, x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """``(∂ norm(x)/∂x)ᵀ grad`` [..., width] for ``nn.RMSNorm`` over the last dim."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    xhat = x * rstd
    gw = grad if norm.weight is None else grad * norm.weight
    return rstd * (gw - xhat * (gw * xhat).mean(dim=-1, keepdim=True))


def unrotate(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The transpose of the rotary rotation (rotation by −angle) on the last dim of
    ``grad`` [..., N, hd] with the rotary tables cos/sin [N, hd]
    (:func:`~ate_fast.models.rotary.rotary_tables`): ``[g1·c + g2·s, g2·c − g1·s]``."""
    return torch.addcmul(grad * cos, swap_halves(grad), sin, value=-1)


def attention_input_vjp(
    block: nn.Module, do: Tensor, saved: BlockSaved, cos: Tensor, sin: Tensor
) -> Tensor:
    """``∂/∂h`` [B, H, width] of the attention output (before ``W_o``) at the block's
    normed input h, from ``do`` [B, heads, H, hd]."""
    q, k, v = saved.q, saved.k, saved.v
    batch, heads, horizon, hd = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    rows = heads // kv_heads * horizon  # the query rows that share one key/value head
    qg = q.reshape(batch, kv_heads, rows, hd)
    dog = do.reshape(batch, kv_heads, rows, hd)
    scale = 1.0 / math.sqrt(hd)
    p = torch.softmax((qg @ k.transpose(-1, -2)) * scale, dim=-1)  # [B, kvh, rows, N]
    dp = dog @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True)) * scale
    dq = (ds @ k).view(batch, heads, horizon, hd)
    actions = slice(length - horizon, length)  # the rows of K and V that depend on x
    dk = ds[..., actions].transpose(-1, -2) @ qg  # [B, kvh, H, hd]
    dv = p[..., actions].transpose(-1, -2) @ dog
    dq = unrotate(dq, cos[-horizon:], sin[-horizon:])
    dk = unrotate(dk, cos[-horizon:], sin[-horizon:])
    dq = dq.transpose(1, 2).reshape(batch, horizon, heads * hd)
    dkv = torch.cat([dk, dv], dim=1).transpose(1, 2).reshape(batch, horizon, 2 * kv_heads * hd)
    return dq @ block.q.weight + dkv @ block.kv.weight


def block_input_vjp(
    block: nn.Module, grad: Tensor, saved: BlockSaved, cos: Tensor, sin: Tensor
) -> Tensor:
    """``(∂ block(x)/∂x)ᵀ grad`` [B, H, width] from ``grad`` on the block's output."""
    dm = grad @ block.down.weight  # [B, H, mlp_dim]
    dgate = torch.ops.aten.gelu_backward(dm * saved.up, saved.gate, approximate="tanh")
    dgu = torch.cat([dgate, dm * saved.act], dim=-1)
    dx1 = grad + rms_norm_input_vjp(dgu @ block.gate_up.weight, saved.x1, block.mlp_norm)
    batch, horizon, _ = grad.shape
    do = (dx1 @ block.o.weight).view(batch, horizon, block.num_heads, block.head_dim)
    dh = attention_input_vjp(block, do.transpose(1, 2), saved, cos, sin)
    return dx1 + rms_norm_input_vjp(dh, saved.x, block.attn_norm)


def head_input_vjp(
    head: nn.Module,
    u: Tensor,
    tokens: Tensor,
    saved: list[BlockSaved],
    pre_silu: Tensor,
    cos: Tensor,
    sin: Tensor,
) -> Tensor:
    """``(∂out/∂x)ᵀ u`` [B, H, D] for the head's output ``out`` [B, H, D].

    ``tokens`` [B, H, width]: the last block's output; ``saved``: each block's
    :class:`BlockSaved`; ``pre_silu`` [B, H, width]: the time MLP's SiLU input.
    """
    g = rms_norm_input_vjp(u @ head.action_out.weight, tokens, head.final_norm)
    for block, kept in zip(reversed(head.blocks), reversed(saved)):
        g = block_input_vjp(block, g, kept, cos, sin)
    s = torch.sigmoid(pre_silu)
    g = (g @ head.time_mlp_out.weight) * (s * (1 + pre_silu * (1 - s)))
    width = tokens.shape[-1]
    g = g @ head.time_mlp_in.weight[:, :width]  # the action tokens' half of the input
    return g @ head.action_in.weight
