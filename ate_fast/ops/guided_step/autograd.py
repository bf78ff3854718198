"""The guided step's backward: ``out = a·x + b·(m + λ·clip(c·g, −κ, κ)) + d·m_prev + s·z``
is linear in every tensor but ``g`` (and ``c``), whose gradient passes where the clip
does not saturate (``torch.clamp``'s subgradient)."""

from __future__ import annotations

import torch
from torch import Tensor

from ate_fast.ops.constants import compute_dtype

INPUTS = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s")


def setup_context(ctx, inputs, output) -> None:
    x, m, a, b, g, c, m_prev, d, z, s, scale, clamp = inputs
    ctx.save_for_backward(x, m, a, b, g, c, m_prev, d, z, s)
    ctx.scale, ctx.clamp = scale, clamp


def _sum_rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


def backward(ctx, grad: Tensor):
    """Only the gradients autograd asks for (``ctx.needs_input_grad``): in a Steer loss that
    is ``m`` alone: one multiply instead of every input's gradient and its row sums."""
    x, m, a, b, g, c, m_prev, d, z, s = ctx.saved_tensors
    scale, clamp = ctx.scale, ctx.clamp
    need = dict(zip(INPUTS, ctx.needs_input_grad))
    cd = compute_dtype(m.dtype)
    n = m.ndim

    def rows(coef):
        return coef.reshape(-1, *([1] * (n - 1)))

    gc = grad.to(cd)
    grads = dict.fromkeys(INPUTS)
    if need["m"]:
        grads["m"] = (rows(b) * gc).to(m.dtype)
    if g is not None and (need["g"] or need["c"] or need["b"]):
        u = rows(c) * g.to(cd)
        inside = ((u >= -clamp) & (u <= clamp)).to(cd)
        through = rows(b) * gc * scale * inside
        if need["g"]:
            grads["g"] = (through * rows(c)).to(g.dtype)
        if need["c"]:
            grads["c"] = _sum_rows(through * g.to(cd))
    if need["b"]:
        corrected = m.to(cd)
        if g is not None:
            corrected = corrected + scale * torch.clamp(u, -clamp, clamp)
        grads["b"] = _sum_rows(gc * corrected)
    for name, tensor, coef_name, coef in (
        ("x", x, "a", a),
        ("m_prev", m_prev, "d", d),
        ("z", z, "s", s),
    ):
        if tensor is None:
            continue
        if need[name]:
            grads[name] = (rows(coef) * gc).to(tensor.dtype)
        if need[coef_name]:
            grads[coef_name] = _sum_rows(gc * tensor.to(cd))
    return (*(grads[k] for k in INPUTS), None, None)
