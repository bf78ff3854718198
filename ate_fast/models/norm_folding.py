"""A flow transformer's RMSNorm weights folded into the layers that read the norms' output.

``W·(g ⊙ x̂)`` is ``(W·diag(g))·x̂``: an RMSNorm's weight ``g`` [width] can live in the
columns of the linear layer after it, leaving a weightless norm (``x̂ = x / rms(x)``). The
head then computes the same function — each folded product rounded once in the weights'
dtype, as a deployment build (TensorRT, a fused checkpoint) folds it — and its Triton
path needs no per-call work for the fold: with a weightless MLP norm, W_gate_up is its own
folded copy, so the gated-GELU kernel applies the norm and that norm's kernel goes (one
launch fewer per block and step: 18 per π0 step) without the 2 × 302 MB per call that
folding a weighted norm costs (``FlowTransformerHead.fold_mlp_norm``).

For inference: the head's parameters change (the norms' weights are gone, the linear
layers' weights hold them), so a state dict of the unfolded head no longer loads into it
and training it afterwards trains another parametrization.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ate_fast.errors import InvalidArgumentError
from ate_fast.models.block_epilogues import fold_norm_weight
from ate_fast.module_checks import plain_linear, plain_rms_norm


def norm_pairs(head: Any) -> list[tuple[str, nn.Module, list[tuple[str, nn.Module]]]]:
    """``(norm's name, norm, [(linear's name, linear), …])`` of a ``FlowTransformerHead``:
    each block's attention norm with q and kv, its MLP norm with gate_up, and the final norm
    with action_out."""
    pairs = []
    for i, block in enumerate(head.blocks):
        name = f"blocks.{i}"
        pairs.append((f"{name}.attn_norm", block.attn_norm,
                      [(f"{name}.q", block.q), (f"{name}.kv", block.kv)]))  # fmt: skip
        pairs.append((f"{name}.mlp_norm", block.mlp_norm, [(f"{name}.gate_up", block.gate_up)]))
    pairs.append(("final_norm", head.final_norm, [("action_out", head.action_out)]))
    return pairs


def _check_foldable(pairs: list) -> None:
    """Every norm a plain ``nn.RMSNorm`` and every reader a plain ``nn.Linear``: a wrapper
    (LoRA) or a hook computes something the fold would not carry."""
    for norm_name, norm, linears in pairs:
        if not plain_rms_norm(norm):
            raise InvalidArgumentError(
                f"fold_norm_weights_: {norm_name} must be a plain torch.nn.RMSNorm without "
                f"hooks, got {type(norm).__name__}"
                + (" with forward hooks" if type(norm) is nn.RMSNorm else "")
            )
        for name, linear in linears:
            if not plain_linear(linear):
                raise InvalidArgumentError(
                    f"fold_norm_weights_: {name} must be a plain torch.nn.Linear without hooks "
                    f"(merge a wrapper such as LoRA into its weight first), got "
                    f"{type(linear).__name__}"
                )
            if linear.weight.shape[1] != norm.weight.shape[0]:
                raise InvalidArgumentError(
                    f"fold_norm_weights_: {name} reads {linear.weight.shape[1]} features, "
                    f"{norm_name} normalizes {norm.weight.shape[0]}"
                )


@torch.no_grad()
def fold_norm_weights_(head: Any) -> Any:
    """Fold every weighted RMSNorm of ``head`` (a ``FlowTransformerHead``) into the linear
    layers that read it, in place; returns ``head``. Norms already weightless are left as
    they are (folding twice is folding once). Raises
    :class:`~ate_fast.errors.InvalidArgumentError` naming the first layer that is not plain
    before anything changes."""
    pairs = [p for p in norm_pairs(head) if p[1].weight is not None]
    _check_foldable(pairs)
    for _, norm, linears in pairs:
        for _, linear in linears:  # the per-call fold's product, kept
            linear.weight.copy_(fold_norm_weight(linear.weight, norm))
        norm.register_parameter("weight", None)
        norm.elementwise_affine = False
    return head
