"""Fused MLP-encoder latent guidance: encoder forward, latent distance gradient and the
backward to the input in one call (ATE's per-step hot path).

    g = ∇_x y(x),   y(x) = −w·‖z(x) − z*‖²  per sample,
    z(x) = μ(mask ⊙ x)  (+ exp(log σ²/2) ⊙ ε with ``eps``),   z* = target or z(a0)

for the plain MLP encoder of :mod:`ate_fast.align` (``Linear`` layers with one
activation between them; the last layer gives ``concat(μ, log σ²)``). The distance weight
``w = 1/d_z`` is the paper's per-sample mean; ``1/(B·d_z)`` the released code's batch
mean. The result is a constant for the training loss (no gradient flows through it).

Backends: ``ref`` (forward ops only, the ONNX-exportable decomposition), ``cpu`` (C++,
blocked GEMV/GEMM with OpenMP, float32/float64, and bfloat16 storage with float32
arithmetic: the float32 kernel's result rounded once), ``cuda`` (one cooperative kernel,
float32/float64/float16/bfloat16 with float32 accumulation), ``triton`` (2·L kernels
for L layers — a GEMM per layer and direction with bias/activation/latent epilogues —
:mod:`ate_fast.ops.mlp_guidance.triton`; CUDA after ``cuda`` in preference, float32/
float64/float16/bfloat16, and on the CPU float32/float64 only through
``TRITON_INTERPRET=1`` and ``ATE_FAST_BACKEND=triton``; float32/float64 tested on an H100).
Registered as ``torch.ops.ate_fast.mlp_guidance``.

Layout: :mod:`.ref` (the definition), :mod:`.validation`, :mod:`.dispatch`, :mod:`.triton`;
this module registers the op and holds the public function and :func:`mlp_encoder_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.module_checks import plain_tree
from ate_fast.ops.constants import ACTIVATIONS, MAX_MLP_LAYERS
from ate_fast.ops.mlp_guidance.dispatch import (
    FUSED_MAX_BATCH,
    mlp_guidance_into,
    selected_backend,
)
from ate_fast.ops.mlp_guidance.ref import mlp_guidance_reference
from ate_fast.ops.mlp_guidance.validation import validate

__all__ = [
    "FUSED_MAX_BATCH",
    "mlp_encoder_parts",
    "mlp_guidance",
    "mlp_guidance_into",
    "mlp_guidance_reference",
    "selected_backend",
]


def mlp_encoder_parts(
    module: nn.Module,
) -> Optional[tuple[list[Tensor], list[Optional[Tensor]], str]]:
    """``(weights, biases, activation)`` if ``module`` (or its ``.encoder``) is a plain MLP
    encoder the fused kernel implements, else None.

    Recognised: a module with ``layers`` (``nn.ModuleList`` of ``nn.Linear`` only, ≤ 16)
    and ``activation`` (a name in gelu/silu/relu/tanh) whose forward applies the activation
    between layers and returns ``(μ, log σ²)`` halves of the last layer — the contract of
    ``ate_fast.align``'s ``MLPEncoder`` — with no forward hooks on it or its layers
    (:func:`ate_fast.module_checks.plain_tree`).
    """
    encoder = getattr(module, "encoder", module)
    layers = getattr(encoder, "layers", None)
    activation = getattr(encoder, "activation", None)
    if not isinstance(layers, nn.ModuleList) or activation not in ACTIVATIONS:
        return None
    if not 1 <= len(layers) <= MAX_MLP_LAYERS or not all(type(m) is nn.Linear for m in layers):
        return None
    if not plain_tree(encoder):  # a hook (or a wrapped submodule) the kernel would skip
        return None
    if layers[-1].out_features % 2:
        return None
    return [m.weight for m in layers], [m.bias for m in layers], activation


# ---------------------------------------------------------------- torch.library
@torch.library.custom_op(
    "ate_fast::mlp_guidance",
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor?[] biases, int activation, Tensor? target, "
    "Tensor? a0, Tensor? mask, Tensor? eps, float distance_weight) -> (Tensor, Tensor)",
)
def _mlp_guidance_op(x, weights, biases, activation, target, a0, mask, eps, distance_weight):
    g, z = _fresh_outputs(x, weights)
    mlp_guidance_into(g, z, x, weights, biases, activation, target, a0, mask, eps,
                      distance_weight, fresh_out=True)  # fmt: skip
    return g, z


@_mlp_guidance_op.register_fake
def _(x, weights, biases, activation, target, a0, mask, eps, distance_weight):
    validate(x, weights, biases, activation, target, a0, mask, eps, distance_weight)
    return torch.empty_like(x), x.new_empty((x.shape[0], weights[-1].shape[0] // 2))


def _fresh_outputs(x: Tensor, weights: Sequence) -> tuple[Tensor, Tensor]:
    """New ``(g, z)`` for a call that then validates its arguments: shaped without trusting
    them, so that a bad ``x`` or ``weights`` meets validation's error naming it (a 0-dim
    ``x`` was an IndexError here)."""
    last = weights[-1] if len(weights) else None
    dz = last.shape[0] // 2 if isinstance(last, Tensor) and last.ndim >= 1 else 0
    return torch.empty_like(x), x.new_empty((x.shape[0] if x.ndim else 0, dz))


# ---------------------------------------------------------------- public API
def mlp_guidance(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activation: str = "gelu",
    *,
    target: Optional[Tensor] = None,
    a0: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    distance_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Fused guidance gradient through an MLP encoder.

    Args:
        x: ``[B, H, D]`` the point where the gradient is taken (noisy chunk / sample).
        weights, biases: the encoder's ``nn.Linear`` parameters in order (``W_l`` is
            ``[out, in]``, the first ``in`` is ``H·D``, the last ``out`` is ``2·d_z``);
            see :func:`mlp_encoder_parts`.
        activation: ``"gelu"`` (exact erf), ``"silu"``, ``"relu"`` or ``"tanh"``.
        target: z*, ``[d_z]`` or ``[B, d_z]``; or
        a0: ``[B, H, D]`` clean chunk, z* = z(a0) computed in the same call (training).
        mask: action-dim mask ``[D]`` or ``[B, D]`` applied to the encoder input.
        eps: ``[B, d_z]`` reparameterisation noise (``latent="sample"``), shared by x and a0.
        distance_weight: w in ``y = −w·‖z − z*‖²``: ``1/d_z`` (per-sample mean, the paper)
            or ``1/(B·d_z)`` (batch mean, the released code).

    Returns:
        ``(g [B, H, D], z [B, d_z])``: the gradient of ``y`` w.r.t. ``x`` and ``x``'s latent.
    """
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"mlp_guidance: x must be a torch.Tensor, got {type(x).__name__}")
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"mlp_guidance: activation must be one of {ACTIVATIONS}, got {activation!r}"
        )
    args = (x, list(weights), list(biases), ACTIVATIONS.index(activation), target, a0, mask, eps,
            float(distance_weight))  # fmt: skip
    tensors = (x, target, a0, mask, eps, *args[1], *args[2])
    # tensor subclasses (fake, functional) take the registered op; plain tensors, and
    # anything that is no tensor (validation names it), the direct call
    if not torch.compiler.is_compiling() and all(
        not isinstance(t, Tensor) or type(t) is Tensor or isinstance(t, nn.Parameter)
        for t in tensors
    ):
        g, z = _fresh_outputs(x, args[1])
        mlp_guidance_into(g, z, *args, fresh_out=True)
        return g, z
    return torch.ops.ate_fast.mlp_guidance(*args)
