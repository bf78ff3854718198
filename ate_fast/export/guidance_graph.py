"""Latent guidance as explicit forward ops, for the exported graph (ONNX has no autograd).

For ``ate_fast.align``'s MLP encoder the input gradient of ``y = −(1/d_z)‖μ(x) − z*‖²``
is a chain of transposed matmuls and activation derivatives:
:func:`ate_fast.ops.mlp_guidance_reference` writes it exactly so, and that is what the
graph runs (the fused kernels compute the same function). ``mode="tweedie"`` evaluates it
at ``x0_hat`` and scales by the scalar ``dx0_dx`` as :class:`ate_fast.steer.LatentGuidance`
does.

Refused, with an error saying what to change: any guidance other than
:class:`ate_fast.steer.LatentGuidance` (a custom ``Guidance.gradient`` uses autograd),
LatentGuidance subclasses that override the gradient, and encoders other than the MLP
encoder — the transformer encoder's input gradient (attention, layer norm, softmax
backward) is not written out as forward ops.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ate_fast.ops.mlp_guidance import mlp_encoder_parts
from ate_fast.ops.mlp_guidance_ref import mlp_guidance_reference


class GuidanceExportError(ValueError):
    """The guidance passed to ``to_onnx`` cannot be written as forward ops."""


class MLPGuidanceGraph(nn.Module):
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
        super().__init__()
        self.activation = activation
        self.mode = mode
        self.num_layers = len(weights)
        self.latent_dim = weights[-1].shape[0] // 2
        for i, (w, b) in enumerate(zip(weights, biases)):
            self.register_buffer(f"weight{i}", w.detach().to(torch.float32).clone())
            self.register_buffer(
                f"bias{i}", None if b is None else b.detach().to(torch.float32).clone()
            )
        self.register_buffer("mask", None if mask is None else mask.detach().float().clone())
        self.register_buffer("target", None if target is None else target.detach().float().clone())

    def forward(
        self, x: Tensor, x0_hat: Optional[Tensor], dx0_dx: Tensor, target: Optional[Tensor]
    ) -> Tensor:
        """``x``, ``x0_hat``: [B, H, D]; ``dx0_dx``: [1] or [B]; ``target``: [B, d_z] (None:
        the baked one). Returns g [B, H, D]."""
        weights = [getattr(self, f"weight{i}") for i in range(self.num_layers)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_layers)]
        if target is None:
            target = self.target
        point = x if self.mode == "direct" else x0_hat
        g, _ = mlp_guidance_reference(
            point, weights, biases, self.activation, target=target, mask=self.mask,
            scale=1.0 / self.latent_dim,
        )  # fmt: skip
        if self.mode == "tweedie":
            g = g * dx0_dx.reshape(-1, 1, 1).to(g.dtype)
        return g


def _encoder_module(guidance: Any) -> Any:
    from ate_fast.steer import LatentGuidance

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


def guidance_graph(guidance: Any, target_input: bool, batch: int) -> MLPGuidanceGraph:
    """The :class:`MLPGuidanceGraph` of a LatentGuidance, or a GuidanceExportError.

    ``target_input``: the target becomes a graph input (else ``guidance.target`` is baked
    in; a per-sample [B, d_z] target can only be baked into a graph of that batch ``batch``).
    """
    source = _encoder_module(guidance)
    parts = mlp_encoder_parts(source) if isinstance(source, nn.Module) else None
    if parts is None:
        arch = getattr(source, "arch", None)
        what = (
            "ActionVAE(arch='transformer')"
            if arch == "transformer"
            else f"{type(getattr(source, 'encoder', source)).__name__}"
        )
        raise GuidanceExportError(
            f"guidance: the encoder ({what}) cannot be exported. Only ate_fast.align's MLP "
            "encoder (ActionVAE(arch='mlp') or MLPEncoder) has its input gradient written as "
            "forward ops; the transformer encoder's is not implemented. Train the Align VAE "
            "with arch='mlp' (ate-fast align ... --arch mlp) or export without guidance"
        )
    weights, biases, activation = parts
    mask = guidance.encoder.mask
    if mask is not None and mask.ndim != 1:
        raise GuidanceExportError(
            f"guidance: the action mask must be [D] for export, got {tuple(mask.shape)} (a "
            "per-sample [B, D] mask would tie the graph to one batch)"
        )
    target = guidance.target
    latent_dim = weights[-1].shape[0] // 2
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
    return MLPGuidanceGraph(list(weights), list(biases), activation, mask, guidance.mode, baked)


def guidance_settings(guidance: Any, graph: MLPGuidanceGraph, target_input: bool) -> dict:
    """What the graph's metadata records about the guidance."""
    return {
        "scale": float(guidance.scale),
        "clamp": float(guidance.clamp) if guidance.clamp != float("inf") else "inf",
        "mode": guidance.mode,
        "latent_dim": graph.latent_dim,
        "activation": graph.activation,
        "layers": graph.num_layers,
        "masked": graph.mask is not None,
        "target": "input" if target_input else "baked",
    }
