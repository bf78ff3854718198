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
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ate_fast.models import block_epilogues_cpu, l2_prefetch
from ate_fast.models.block_epilogues import MAX_ROW, kernel_path, norm_eps
from ate_fast.models.cpu_gemm import linear_residual_rows, times_weight
from ate_fast.models.gemm_alignment import aligned_rows, aligned_writes_may_run
from ate_fast.models.rotary import swap_halves


class BlockSaved(NamedTuple):
    """What a block's forward keeps for its input-VJP (x [B, H, width], L conditioning
    tokens, N = L + H)."""

    x: Tensor  # the block's input [B, H, width]
    # rotated queries [B, kv_heads, H·heads/kv_heads, hd]: each key/value head's query heads
    # folded into its rows, ordered (token, query head) (block_epilogues.rotate_qkv)
    q: Tensor
    k: Tensor  # rotated keys [B, kv_heads, N, hd] (before sharing across query heads)
    v: Tensor  # values [B, kv_heads, N, hd]
    x1: Tensor  # after the attention residual [B, H, width]
    gate: Tensor  # [B, H, mlp_dim]
    up: Tensor  # [B, H, mlp_dim]
    act: Tensor  # gelu_tanh(gate) [B, H, mlp_dim]
    # (PrefixSlot, its writes) when k and v are a call's prefix buffers (checked by the
    # pullback: a later forward with the same features rewrites them), else None
    slot: Any = None
    bias: Optional[Tensor] = None  # attention's additive mask [B, 1, 1, N] (a padded prefix)
    # [W_q; W_kv] when the forward projected with one GEMM (FlowStepFeatures.qkv), else None
    qkv: Optional[Tensor] = None
    # W_gate_up with the MLP norm's weight folded in when the forward folded that norm
    # (FlowStepFeatures.gate_up), else None
    gate_up: Optional[Tensor] = None
    attn_norm_folded: bool = False  # qkv holds the attention norm's weight
    # the probabilities softmax(q·kᵀ/√hd) [B, kv_heads, rows, N] the forward multiplied v by
    # (ATE_FAST_PREFIX_ATTENTION=gemm forms them), else None: the pullback recomputes them
    p: Optional[Tensor] = None


def rms_norm_input_vjp(grad: Tensor, x: Tensor, norm: nn.RMSNorm, weighted: bool = False) -> Tensor:
    """``(∂ norm(x)/∂x)ᵀ grad`` [..., width] for ``nn.RMSNorm`` over the last dim
    (``weighted``: ``grad`` already multiplied by the norm's weight)."""
    rstd = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm_eps(norm, x.dtype))
    xhat = x * rstd
    gw = grad if norm.weight is None or weighted else grad * norm.weight
    return rstd * (gw - xhat * (gw * xhat).mean(dim=-1, keepdim=True))


def rms_norm_vjp(
    grad: Tensor, x: Tensor, norm: nn.RMSNorm, residual: Optional[Tensor] = None,
    weighted: bool = False,
) -> Tensor:  # fmt: skip
    """``residual + (∂ norm(x)/∂x)ᵀ grad`` [..., width] (``residual`` None: 0): torch ops,
    or one Triton kernel (:mod:`ate_fast.models.block_epilogues`). ``weighted``: ``grad``
    is already multiplied by the norm's weight (the weight folded into the next
    projection, :attr:`BlockSaved.gate_up`)."""
    weight = None if weighted else norm.weight
    extra = tuple(t for t in (residual, weight) if t is not None)
    path = kernel_path(grad, x, *extra)
    if path == "triton" and x.shape[-1] <= MAX_ROW:
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.rms_norm_vjp(
            grad.contiguous(), x.contiguous(), weight, norm_eps(norm, x.dtype),
            None if residual is None else residual.contiguous(),
        )  # fmt: skip
    if path == "native":
        return block_epilogues_cpu.rms_norm_vjp(grad, x, weight, norm_eps(norm, x.dtype), residual)
    dx = rms_norm_input_vjp(grad, x, norm, weighted)
    return dx if residual is None else residual + dx


def gelu_gate_backward(dm: Tensor, saved: BlockSaved) -> Tensor:
    """The gate/up projection's output gradient ``[dm·up·gelu′(gate), dm·gelu(gate)]``
    [B, H, 2·mlp_dim] from the gated product's gradient ``dm`` [B, H, mlp_dim]."""
    path = kernel_path(dm, saved.gate, saved.up, saved.act)
    if path == "triton":
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.gelu_gate_backward(dm.contiguous(), saved.gate, saved.up,
                                          saved.act.contiguous())  # fmt: skip
    if path == "native":
        return block_epilogues_cpu.gelu_gate_backward(dm, saved.gate, saved.up, saved.act)
    dgate = torch.ops.aten.gelu_backward(dm * saved.up, saved.gate, approximate="tanh")
    return torch.cat([dgate, dm * saved.act], dim=-1)


def softmax_backward(scores: Tensor, dp: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(p, ds)``: the attention probabilities ``softmax(scores·scale)`` and the scores'
    gradient ``p ⊙ (dp − rowsum(dp ⊙ p))·scale`` [..., N]."""
    path = kernel_path(scores, dp)
    if path == "triton" and scores.shape[-1] <= MAX_ROW:
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.softmax_backward(scores, dp, scale)  # rows of one stride: read in place
    if not aligned_writes_may_run(scores, dp):
        p = torch.softmax(scores * scale, dim=-1)
        return p, softmax_grad(p, dp, scale)
    # p and ds written into 16-byte-aligned rows: the GEMM of dv reads p (dq's, dk's ds)
    p = aligned_rows(scores.shape, scores)
    if path == "native":  # one pass per row for both
        return block_epilogues_cpu.softmax_backward(
            scores, dp, scale, p, aligned_rows(scores.shape, scores)
        )
    p = torch.softmax(scores * scale, dim=-1, out=p)
    return p, softmax_grad(p, dp, scale)


def softmax_grad(p: Tensor, dp: Tensor, scale: float) -> Tensor:
    """The scores' gradient ``p ⊙ (dp − rowsum(dp ⊙ p))·scale`` [..., N] from the
    probabilities ``p`` the forward kept (:attr:`BlockSaved.p`) and ``dp`` [..., N]."""
    path = kernel_path(p, dp)
    if path == "triton" and p.shape[-1] <= MAX_ROW:
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.softmax_grad(p, dp, scale)  # rows of one stride: read in place
    if path == "native" and aligned_writes_may_run(p, dp):  # the GEMMs of dq, dk read ds
        return block_epilogues_cpu.softmax_grad(p, dp, scale, aligned_rows(p.shape, p))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    if not aligned_writes_may_run(p, dp):
        return ds * scale
    return torch.mul(ds, scale, out=aligned_rows(ds.shape, ds))  # the GEMMs of dq, dk read it


def unrotate_pack(
    dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """The q and kv projections' output gradients, ``dq`` [B, H, heads·hd] and
    ``[dk | dv]`` [B, H, 2·kv_heads·hd], from ``dq`` [B, kv_heads, H·g, hd] (the queries'
    grouped layout, :class:`BlockSaved`) and ``dk``, ``dv`` [B, kv_heads, H, hd] (the
    rotation undone on dq and dk; tables ``cos``, ``sin`` [N, hd] or per sample
    [B, 1, N, hd], their last H rows the action positions)."""
    path = kernel_path(dq, dk, dv, cos, sin)
    if path == "triton":
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.unrotate_pack(dq.contiguous(), dk.contiguous(), dv.contiguous(),
                                     cos.contiguous(), sin.contiguous())  # fmt: skip
    if path == "native":
        return block_epilogues_cpu.unrotate_pack(dq, dk, dv, cos, sin)
    dq, dk, dv = _unrotated_by_token(dq, dk, dv, cos, sin)
    batch, horizon = dq.shape[:2]
    return dq.reshape(batch, horizon, -1), torch.cat([dk, dv], dim=2).view(batch, horizon, -1)


def unrotate_pack_qkv(dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`unrotate_pack`'s two gradients side by side, ``[dq | dk | dv]``
    [B, H, (heads + 2·kv_heads)·hd]: the output gradient of the fused projection
    ``[W_q; W_kv]`` (:attr:`~ate_fast.models.flow_transformer.FlowStepFeatures.qkv`), so
    that one GEMM takes it back to the block's normed input."""
    path = kernel_path(dq, dk, dv, cos, sin)
    if path == "native":
        return block_epilogues_cpu.unrotate_pack(dq, dk, dv, cos, sin, fused=True)[0]
    if path == "triton":
        import ate_fast.models.block_epilogues_triton as kernels

        batch, kv_heads, horizon, hd = dk.shape
        heads = kv_heads * (dq.shape[2] // horizon)
        out = dq.new_empty(batch, horizon, (heads + 2 * kv_heads) * hd)
        kernels.unrotate_pack(dq.contiguous(), dk.contiguous(), dv.contiguous(),
                              cos.contiguous(), sin.contiguous(), out)  # fmt: skip
        return out
    dq, dk, dv = _unrotated_by_token(dq, dk, dv, cos, sin)
    return torch.cat([dq, dk, dv], dim=2).flatten(2)


def _unrotated_by_token(
    dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The torch ops of :func:`unrotate_pack`: dq [B, H, heads, hd] (a view with one kv
    head), dk, dv [B, H, kv_heads, hd] (views), dq and dk unrotated."""
    batch, kv_heads, horizon, hd = dk.shape
    dq = dq.view(batch, kv_heads, horizon, -1, hd)  # [B, kv_heads, H, g, hd]
    dq = unrotate(dq, cos[..., -horizon:, None, :], sin[..., -horizon:, None, :])
    dq = dq.transpose(1, 2).reshape(batch, horizon, -1, hd)  # a view with one kv head
    dk = unrotate(dk, cos[..., -horizon:, :], sin[..., -horizon:, :])
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


def unrotate(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The transpose of the rotary rotation (rotation by −angle) on the last dim of
    ``grad`` [..., N, hd] with the rotary tables cos/sin [N, hd]
    (:func:`~ate_fast.models.rotary.rotary_tables`): ``[g1·c + g2·s, g2·c − g1·s]``."""
    return torch.addcmul(grad * cos, swap_halves(grad), sin, value=-1)


def dog_times_v(dog: Tensor, v: Tensor) -> Tensor:
    """``dp = dog·vᵀ`` [B, kv_heads, rows, N] (``dog`` [B, kv_heads, rows, hd], ``v`` [B,
    kv_heads, N, hd]), into 16-byte-aligned rows where an ``out=`` write may run."""
    if not aligned_writes_may_run(dog, v):
        return dog @ v.transpose(-1, -2)
    shape = (*dog.shape[:-1], v.shape[-2])
    return torch.matmul(dog, v.transpose(-1, -2), out=aligned_rows(shape, dog))


def score_products(
    dog: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """``dp = dog·vᵀ`` and ``scores = q·kᵀ (+ bias)`` [B, kv_heads, rows, N] (``dog``, ``q``
    [B, kv_heads, rows, hd]; ``k``, ``v`` [B, kv_heads, N, hd]; ``bias`` [B, 1, 1, N], a
    padded prefix's mask: its keys get no probability). Where an ``out=`` write may run
    (:func:`~ate_fast.models.gemm_alignment.aligned_writes_may_run`), into buffers with
    16-byte-aligned rows (at N = 866 the unaligned products ran on cuBLAS's slowest
    kernels), the mask added in place; else plain products."""
    dp = dog_times_v(dog, v)
    if not aligned_writes_may_run(dog, q, k, v):
        scores = q @ k.transpose(-1, -2)
        return dp, scores if bias is None else scores + bias
    shape = (*q.shape[:-1], k.shape[-2])
    scores = torch.matmul(q, k.transpose(-1, -2), out=aligned_rows(shape, q))
    if bias is not None:  # in place where that keeps torch's result dtype
        same = torch.result_type(scores, bias) == scores.dtype
        scores = scores.add_(bias) if same else scores + bias
    return dp, scores


def attention_input_vjp(
    block: nn.Module, do: Tensor, saved: BlockSaved, cos: Tensor, sin: Tensor
) -> Tensor:
    """``∂/∂h`` [B, H, width] of the attention output (before ``W_o``) at the block's
    normed input h, from ``do`` [B, H, heads·hd] (the gradient of W_o's input)."""
    if saved.slot is not None:
        slot, writes = saved.slot
        slot.check(writes)
    q, k, v = saved.q, saved.k, saved.v
    batch, kv_heads, rows, hd = q.shape  # rows = H·g: the query rows of one key/value head
    horizon, length = do.shape[1], k.shape[2]
    # do in the queries' grouped layout (block_epilogues.rotate_qkv): a view with one kv head
    dog = do.view(batch, horizon, kv_heads, -1).transpose(1, 2).reshape(batch, kv_heads, rows, hd)
    scale = 1.0 / math.sqrt(hd)
    if saved.p is not None:  # the forward's own probabilities: no scores, no recompute
        p = saved.p
        ds = softmax_grad(p, dog_times_v(dog, v), scale)
    else:
        dp, scores = score_products(dog, q, k, v, saved.bias)  # [B, kvh, rows, N]
        p, ds = softmax_backward(scores, dp, scale)
    dq = ds @ k  # [B, kvh, rows, hd]
    actions = slice(length - horizon, length)  # the rows of K and V that depend on x
    dk = ds[..., actions].transpose(-1, -2) @ q  # [B, kvh, H, hd]
    dv = p[..., actions].transpose(-1, -2) @ dog
    if saved.qkv is not None:  # [dq | dkv]·[W_q; W_kv]: one GEMM
        return times_weight(unrotate_pack_qkv(dq, dk, dv, cos, sin), saved.qkv)
    dq, dkv = unrotate_pack(dq, dk, dv, cos, sin)
    # dq·W_q + dkv·W_kv with the first product as the second GEMM's C operand, accumulated
    # into it (nothing else reads it: no copy of C first)
    first = times_weight(dq, block.q.weight)
    out = linear_residual_rows(dkv.reshape(-1, dkv.shape[-1]), block.kv.weight.t(),
                               first.view(-1, first.shape[-1]), in_place=True)  # fmt: skip
    return out.view(batch, horizon, -1)


def block_input_vjp(
    block: nn.Module, grad: Tensor, saved: BlockSaved, cos: Tensor, sin: Tensor,
    ahead: Optional[list[Tensor]] = None,
) -> Tensor:  # fmt: skip
    """``(∂ block(x)/∂x)ᵀ grad`` [B, H, width] from ``grad`` on the block's output;
    ``ahead``: weights the next VJP reads first, read into L2 during this one's attention
    (``ATE_FAST_L2_PREFETCH``: :mod:`~ate_fast.models.l2_prefetch`)."""
    # a folded norm: the weight it came back through holds the norm's weight, so the
    # gradient is already multiplied by it
    mlp_folded = saved.gate_up is not None
    dm = times_weight(grad, block.down.weight)  # [B, H, mlp_dim]
    dgu = gelu_gate_backward(dm, saved)
    gate_up = saved.gate_up if mlp_folded else block.gate_up.weight
    dn = times_weight(dgu, gate_up)  # [B, H, width]: at the MLP norm's output
    dx1 = rms_norm_vjp(dn, saved.x1, block.mlp_norm, residual=grad, weighted=mlp_folded)
    do = times_weight(dx1, block.o.weight)
    prefetching = l2_prefetch.start(ahead) if ahead else None  # HBM idles during attention
    dh = attention_input_vjp(block, do, saved, cos, sin)
    l2_prefetch.join(prefetching)
    return rms_norm_vjp(dh, saved.x, block.attn_norm, residual=dx1,
                        weighted=saved.attn_norm_folded)  # fmt: skip


def _mlp_weights(block: nn.Module, saved: BlockSaved) -> list[Tensor]:
    """The weights a block's VJP reads first: W_down and W_gate_up (or its folded copy)."""
    return [block.down.weight, block.gate_up.weight if saved.gate_up is None else saved.gate_up]


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
    g = rms_norm_vjp(times_weight(u, head.action_out.weight), tokens, head.final_norm)
    pairs = list(zip(reversed(head.blocks), reversed(saved)))
    for i, (block, kept) in enumerate(pairs):
        ahead = _mlp_weights(*pairs[i + 1]) if i + 1 < len(pairs) else None
        g = block_input_vjp(block, g, kept, cos, sin, ahead)
    s = torch.sigmoid(pre_silu)
    g = times_weight(g, head.time_mlp_out.weight) * (s * (1 + pre_silu * (1 - s)))
    width = tokens.shape[-1]
    g = g @ head.time_mlp_in.weight[:, :width]  # the action tokens' half of the input
    return times_weight(g, head.action_in.weight)
