"""Latent guidance as explicit forward ops, for the exported graph (ONNX has no autograd).

For ``ate_fast.align``'s MLP encoder the input gradient of ``y = −(1/d_z)‖μ(x) − z*‖²``
is a chain of transposed matmuls and activation derivatives:
:func:`ate_fast.ops.mlp_guidance_reference` writes it exactly so, and that is what the
graph runs (the fused kernels compute the same function). For its Transformer encoder the
graph runs :func:`ate_fast.steer.transformer_vjp.transformer_latent_gradient`, the
hand-written VJP (attention, softmax, LayerNorm and GELU backward as forward ops).
``mode="tweedie"`` evaluates it at ``x0_hat`` and scales by the scalar ``dx0_dx`` as
:class:`ate_fast.steer.LatentGuidance` does.

Refused, with an error saying what to change: any guidance other than
:class:`ate_fast.steer.LatentGuidance` (a custom ``Guidance.gradient`` uses autograd),
LatentGuidance subclasses that override the gradient, and encoders other than these two
(or a Transformer encoder whose layers the VJP does not cover: pre-norm, other
activations).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.guidance import POLICY_VJP
from ate_fast.ops import mlp_encoder_parts, mlp_guidance_reference
from ate_fast.steer import LatentGuidance
from ate_fast.steer.transformer_vjp import align_transformer_encoder, transformer_latent_gradient


class GuidanceExportError(ValueError):
    """The guidance passed to ``to_onnx`` cannot be written as forward ops."""


class _GuidanceGraph(nn.Module):
    """What both encoders' graphs share: the mask and the baked target as float32 buffers,
    and ``mode`` — the gradient at ``x`` (``"direct"``) or at ``x0_hat`` scaled by
    ``dx0_dx`` (``"tweedie"``). Subclasses write the encoder's VJP in :meth:`gradient`."""

    latent_dim: int

    def __init__(self, mask: Optional[Tensor], mode: str, target: Optional[Tensor]) -> None:
        super().__init__()
        self.mode = mode
        self.register_buffer("mask", None if mask is None else mask.detach().float().clone())
        self.register_buffer("target", None if target is None else target.detach().float().clone())

    def gradient(self, point: Tensor, target: Tensor) -> Tensor:
        """``g`` [B, H, D] of ``−(1/d_z)‖μ(point) − target‖²`` (masked)."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, x0_hat: Optional[Tensor], dx0_dx: Tensor, target: Optional[Tensor]
    ) -> Tensor:
        """``x``, ``x0_hat``: [B, H, D]; ``dx0_dx``: [1] or [B]; ``target``: [B, d_z] (None:
        the baked one). Returns g [B, H, D]."""
        point = x if self.mode == "direct" else x0_hat
        g = self.gradient(point, self.target if target is None else target)
        if self.mode == "tweedie":
            g = g * dx0_dx.reshape(-1, 1, 1).to(g.dtype)
        return g


class MLPGuidanceGraph(_GuidanceGraph):
    """``g`` [B, H, D] of LatentGuidance over an MLP encoder, forward ops only.

    Args:
        weights, biases: the encoder's ``nn.Linear`` parameters (copied, float32).
        activation: the encoder's activation name.
        mask: the action mask [D] or None.
        mode: ``"direct"`` or ``"tweedie"``.
        target: z* [d_z] or [B, d_z] to bake into the graph, or None (a graph input).
    """

    def __init__(
        self,
        weights: list[Tensor],
        biases: list[Optional[Tensor]],
        activation: str,
        mask: Optional[Tensor],
        mode: str,
        target: Optional[Tensor] = None,
    ) -> None:
        super().__init__(mask, mode, target)
        self.activation = activation
        self.num_layers = len(weights)
        self.latent_dim = weights[-1].shape[0] // 2
        for i, (w, b) in enumerate(zip(weights, biases)):
            self.register_buffer(f"weight{i}", w.detach().to(torch.float32).clone())
            self.register_buffer(
                f"bias{i}", None if b is None else b.detach().to(torch.float32).clone()
            )

    def gradient(self, point: Tensor, target: Tensor) -> Tensor:
        weights = [getattr(self, f"weight{i}") for i in range(self.num_layers)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_layers)]
        g, _ = mlp_guidance_reference(
            point, weights, biases, self.activation, target=target, mask=self.mask,
            distance_weight=1.0 / self.latent_dim,
        )  # fmt: skip
        return g


class TransformerGuidanceGraph(_GuidanceGraph):
    """``g`` [B, H, D] of LatentGuidance over ``ate_fast.align``'s Transformer encoder,
    forward ops only (the hand-written VJP).

    Args:
        encoder: the ``TransformerEncoder`` (copied, float32, frozen).
        mask: the action mask [D] or None.
        mode: ``"direct"`` or ``"tweedie"``.
        target: z* [d_z] or [B, d_z] to bake into the graph, or None (a graph input).
    """

    def __init__(
        self, encoder: nn.Module, mask: Optional[Tensor], mode: str, target: Optional[Tensor]
    ) -> None:
        super().__init__(mask, mode, target)
        self.encoder = copy.deepcopy(encoder).float().eval().requires_grad_(False)
        self.latent_dim = encoder.latent_dim
        blocks = encoder.blocks
        self.activation = "gelu" if blocks.middle_block.activation is F.gelu else "relu"
        self.num_layers = 2 * len(blocks.input_blocks) + 1

    def gradient(self, point: Tensor, target: Tensor) -> Tensor:
        return transformer_latent_gradient(self.encoder, point, target, mask=self.mask)


GuidanceGraph = Union[MLPGuidanceGraph, TransformerGuidanceGraph]


def _encoder_module(guidance: Any) -> Any:
    if getattr(guidance, "mode", None) == POLICY_VJP:
        raise GuidanceExportError(
            f"guidance: {type(guidance).__name__} has mode {POLICY_VJP!r} (a VJP through the "
            "policy at every step, e.g. RTCGuidance), which cannot be exported yet: "
            "torch.export does not trace torch.autograd.grad or torch.func.vjp through "
            "model_fn. Sample it with sampler.sample() / capture() instead"
        )
    if not isinstance(guidance, LatentGuidance):
        raise GuidanceExportError(
            "guidance must be an ate_fast.steer.LatentGuidance to be exported: its gradient "
            "is written into the graph as forward ops, and ONNX has no autograd to take a "
            f"custom Guidance's gradient; got {type(guidance).__name__}"
        )
    for method in ("gradient", "latent_gradient"):
        if getattr(type(guidance), method) is not getattr(LatentGuidance, method):
            raise GuidanceExportError(
                f"guidance: {type(guidance).__name__} overrides LatentGuidance.{method}, so "
                "the exported graph would not compute what it computes; export a plain "
                "LatentGuidance"
            )
    return guidance.encoder.source


def guidance_graph(guidance: Any, target_input: bool, batch: int) -> GuidanceGraph:
    """The guidance graph of a LatentGuidance (:class:`MLPGuidanceGraph` or
    :class:`TransformerGuidanceGraph`), or a GuidanceExportError.

    ``target_input``: the target becomes a graph input (else ``guidance.target`` is baked
    in; a per-sample [B, d_z] target can only be baked into a graph of that batch ``batch``).
    """
    source = _encoder_module(guidance)
    parts = mlp_encoder_parts(source) if isinstance(source, nn.Module) else None
    transformer = align_transformer_encoder(source) if parts is None else None
    if parts is None and transformer is None:
        what = type(getattr(source, "encoder", source)).__name__
        raise GuidanceExportError(
            f"guidance: the encoder ({what}) cannot be exported. Only ate_fast.align's "
            "encoders have their input gradient written as forward ops: the MLP encoder "
            "(ActionVAE(arch='mlp')) and the Transformer encoder (ActionVAE(arch="
            "'transformer')) with post-norm GELU/ReLU layers. Use one of those or export "
            "without guidance"
        )
    mask = guidance.encoder.mask
    if mask is not None and mask.ndim != 1:
        raise GuidanceExportError(
            f"guidance: the action mask must be [D] for export, got {tuple(mask.shape)} (a "
            "per-sample [B, D] mask would tie the graph to one batch)"
        )
    target = guidance.target
    latent_dim = transformer.latent_dim if parts is None else parts[0][-1].shape[0] // 2
    if target.shape[-1] != latent_dim:
        raise GuidanceExportError(
            f"guidance.target has {target.shape[-1]} latent dims but the encoder has {latent_dim}"
        )
    if not target_input and target.ndim == 2 and target.shape[0] != batch:
        raise GuidanceExportError(
            f"guidance.target is a batch of {target.shape[0]} latents; it can be baked only "
            f"into a graph of that batch (example batch {batch}): pass one latent [d_z] or "
            "use target_input=True"
        )
    baked = None if target_input else target
    if parts is None:
        return TransformerGuidanceGraph(transformer, mask, guidance.mode, baked)
    weights, biases, activation = parts
    return MLPGuidanceGraph(list(weights), list(biases), activation, mask, guidance.mode, baked)


def guidance_settings(guidance: Any, graph: GuidanceGraph, target_input: bool) -> dict:
    """What the graph's metadata records about the guidance."""
    return {
        "scale": float(guidance.scale),
        "clamp": float(guidance.clamp) if guidance.clamp != float("inf") else "inf",
        "mode": guidance.mode,
        "encoder": "transformer" if isinstance(graph, TransformerGuidanceGraph) else "mlp",
        "latent_dim": graph.latent_dim,
        "activation": graph.activation,
        "layers": graph.num_layers,
        "masked": graph.mask is not None,
        "target": "input" if target_input else "baked",
    }
