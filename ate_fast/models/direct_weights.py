"""Where the reference heads read a layer's weights instead of calling the layer, and the
checks that keep it exact.

The heads split or fuse some layers for speed — the first layer's bias folded over the
steps (MLPHead), the time MLP's first layer split into its tokens' and time's halves
(FlowTransformerHead), a residual add as a GEMM's C operand, and the hand-written
input-VJPs, which multiply by every layer's weight. That reads ``linear.weight`` instead of
calling ``linear(x)``, so it is exact only for a plain layer: a LoRA or other wrapper whose
forward adds to the product, or a forward hook that changes the output, would be skipped
silently. Each such site checks its layer (:func:`~ate_fast.module_checks.plain_linear`)
and calls it otherwise; a head's hand-written input-VJP is used only when every layer
below the head is plain (:func:`~ate_fast.module_checks.plain_tree`), else its pullback is
autograd's (:func:`autograd_input_vjp`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import skinny_gemm
from ate_fast.models.cpu_gemm import linear_residual_rows
from ate_fast.module_checks import plain_linear


def linear_residual(
    linear: nn.Module, x: Tensor, residual: Tensor, in_place: bool = False
) -> Tensor:
    """``residual + linear(x)`` [..., out] for ``x`` [..., in] and ``residual`` [..., out]:
    one GEMM with the residual as C (one kernel and one rounding fewer:
    :func:`~ate_fast.models.cpu_gemm.linear_residual_rows`, or the few-row kernel where
    ``ATE_FAST_SKINNY_GEMM=triton``: :mod:`~ate_fast.models.skinny_gemm`) for a plain
    bias-free ``nn.Linear`` with the residual in its dtype, outside autocast (which would
    round the residual to the GEMM's precision); else the two ops as written.
    ``in_place``: the caller never reads ``residual`` again, so the GEMM may accumulate
    into it (no copy of C first; see ``linear_residual_rows``)."""
    if (
        not plain_linear(linear)
        or linear.bias is not None
        or residual.dtype != linear.weight.dtype
        or torch.is_autocast_enabled(residual.device.type)
    ):
        return residual + linear(x)
    weight = linear.weight
    if residual.shape == x.shape[:-1] + weight.shape[:1] and skinny_gemm.takes(x, weight, residual):
        return skinny_gemm.skinny_linear(x, weight, None, residual)
    return linear_residual_rows(x, weight, residual, in_place)


def autograd_input_vjp(
    name: str, forward: Callable[[Tensor], Tensor], x: Tensor
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(out, pullback)`` of ``forward`` at ``x`` by autograd — what a head's
    ``forward_with_vjp`` returns when its layers are not plain (:func:`plain_tree`): the
    forward at a leaf copy of ``x``, ``pullback(u) = (∂out/∂x)ᵀ u`` (callable repeatedly)."""
    if torch.is_inference_mode_enabled():
        raise InvalidArgumentError(
            f"{name}: its layers are wrapped or hooked (not plain torch.nn layers), so its "
            "input-VJP is autograd's, which torch.inference_mode() forbids (use "
            "torch.no_grad(), or merge the wrapper into the weights)"
        )
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = forward(leaf)

    def pullback(u: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(out, leaf, u.to(out.dtype), retain_graph=True)
        return grad

    return out.detach(), pullback
