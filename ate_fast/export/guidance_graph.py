"""Latent guidance as explicit forward ops, for the exported graph (ONNX has no autograd).

For ``ate_fast.align``'s MLP encoder the input gradient of ``y = −(1/d_z)‖μ(x) − z*‖²``
is a chain of transposed matmuls and activation derivatives:
:func:`ate_fast.ops.mlp_guidance_reference` writes it exactly so, and that is what the
graph runs (the fused kernels compute the same function). For its Transformer encoder the
graph runs :func:`ate_fast.steer.transformer_vjp.transformer_latent_gradient`, the
hand-written VJP (attention, softmax, LayerNorm and GELU backward as forward ops).
``mode="tweedie"`` evaluates it at ``x0_hat`` and scales by the scalar ``dx0_dx`` as
:class:`ate_fast.steer.LatentGuidance` does.

Real-time chunking (:class:`ate_fast.realtime.RTCGuidance`) is :class:`RTCGuidanceGraph`:
the cotangent ``u = W ⊙ (Y − x̂₀)`` with the previous chunk Y and the delay d as graph
inputs (W = the baked mask table's row d). With ``jacobian=True`` (mode ``"policy_vjp"``)
the VJP through the policy is the head's own ``forward_with_vjp`` (forward ops), which the
exported loop calls (:mod:`ate_fast.export.sampler_graph`); with ``jacobian=False`` (mode
``"tweedie"``, LeRobot's RTC) u scaled by ``dx0_dx`` is the gradient, so any traceable
model can be exported with it.

Refused, with an error saying what to change: any guidance other than
:class:`ate_fast.steer.LatentGuidance` or ``RTCGuidance`` (a custom ``Guidance.gradient``
uses autograd), an ``RTCGuidance(jacobian=True)`` over a model without its own input-VJP,
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
from ate_fast.models import FlowTransformerHead, MLPHead
from ate_fast.module_checks import plain_tree
from ate_fast.ops import mlp_encoder_parts, mlp_guidance_reference
from ate_fast.realtime import RTCGuidance
from ate_fast.realtime.prefix_schedules import prefix_weight_table
from ate_fast.sampling.sampler import ModelFn, forward_with_vjp_of
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


class RTCGuidanceGraph(nn.Module):
    """Real-time chunking's cotangent for the exported loop, forward ops only.

    ``forward(x0_hat [B, H, D], prev_chunk [B, H, D], delay int64 [B]) -> u [B, H, D]``,
    ``u = W ⊙ (Y − x̂₀)`` with ``W = table[delay]`` [B, H] (Gather from the baked mask
    table, ``[H − s + 1, H]``: row d is the soft mask for delay d, as
    :class:`~ate_fast.realtime.RTCGuidance` builds it). ``mode`` is the guidance's:
    ``"policy_vjp"`` (the sampler's loop pulls u back through the head's
    ``forward_with_vjp``) or ``"tweedie"`` (``jacobian=False``: the loop takes u·dx0_dx as
    the gradient). The guidance weight ``−min(β, w(t))`` is in the loop's coefficient
    tables.
    """

    def __init__(self, guidance: RTCGuidance, horizon: int) -> None:
        super().__init__()
        self.mode = guidance.mode
        self.execution_horizon = guidance.execution_horizon
        self.prefix_schedule = guidance.prefix_schedule
        self.max_guidance_weight = guidance.max_guidance_weight
        table = prefix_weight_table(horizon, self.execution_horizon, self.prefix_schedule)
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32))

    @property
    def max_delay(self) -> int:
        """H − s, the largest delay the table has a row for."""
        return self.table.shape[0] - 1

    def forward(self, x0_hat: Tensor, prev_chunk: Tensor, delay: Tensor) -> Tensor:
        weights = self.table[delay].unsqueeze(-1).to(x0_hat.dtype)  # [B, H, 1]
        return (prev_chunk.to(x0_hat.dtype) - x0_hat) * weights


def rtc_guidance_graph(guidance: Any, model_fn: ModelFn, horizon: int) -> RTCGuidanceGraph:
    """The graph of an :class:`~ate_fast.realtime.RTCGuidance` or another ``"policy_vjp"``
    guidance, or a GuidanceExportError saying why not: only ``RTCGuidance`` (in the openpi
    convention), for previous chunks of the examples' horizon; with ``jacobian=True`` over a
    model with its own input-VJP (``forward_with_vjp``: ``ate_fast.models``' MLPHead and
    FlowTransformerHead), with ``jacobian=False`` over any traceable model."""
    if not isinstance(guidance, RTCGuidance):
        raise GuidanceExportError(
            f"guidance: {type(guidance).__name__} has mode {POLICY_VJP!r} (a VJP through the "
            "policy); of those, only ate_fast.realtime.RTCGuidance can be exported (its "
            "cotangent is written into the graph)"
        )
    vjp = forward_with_vjp_of(model_fn) if guidance.mode == POLICY_VJP else None
    if guidance.mode == POLICY_VJP and vjp is None:
        raise GuidanceExportError(
            f"guidance: {type(guidance).__name__} has mode {POLICY_VJP!r} (a VJP through the "
            "policy at every step), and the sampler's model_fn has no input-VJP of its own "
            "(a forward_with_vjp(x, t, cond) -> (out, pullback) method, as ate_fast.models' "
            "MLPHead and FlowTransformerHead have). torch.export traces neither "
            "torch.autograd.grad nor torch.func.vjp through model_fn, so an arbitrary "
            "model cannot be exported with it: add forward_with_vjp to the model (forward "
            "ops only), export RTCGuidance(..., jacobian=False) (no VJP through the policy, "
            "as LeRobot's RTC), or sample with sampler.sample() / capture()"
        )
    head = getattr(vjp, "__self__", None)
    if isinstance(head, (MLPHead, FlowTransformerHead)) and not plain_tree(head):
        raise GuidanceExportError(
            f"guidance: RTCGuidance(jacobian=True) pulls back through the {type(head).__name__}'s "
            "input-VJP, and this head has wrapped or hooked layers (e.g. LoRA adapters), so "
            "its VJP is autograd's, which torch.export cannot trace: merge the adapters into "
            "the weights first (e.g. PEFT's merge_and_unload()), or export "
            "RTCGuidance(..., jacobian=False)"
        )
    prev = guidance.prev_chunk
    if prev is not None and prev.shape[1] != horizon:
        raise GuidanceExportError(
            f"guidance.prev_chunk has horizon {prev.shape[1]} but example_noise has {horizon}"
        )
    if guidance.execution_horizon >= horizon:
        raise GuidanceExportError(
            f"guidance.execution_horizon must be < H = {horizon}, got {guidance.execution_horizon}"
        )
    return RTCGuidanceGraph(guidance, horizon)


GuidanceGraph = Union[MLPGuidanceGraph, TransformerGuidanceGraph, RTCGuidanceGraph]


def _encoder_module(guidance: Any) -> Any:
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
    if isinstance(graph, RTCGuidanceGraph):
        return {
            "scale": float(guidance.scale), "clamp": "inf", "mode": graph.mode,
            "guidance": "rtc", "execution_horizon": graph.execution_horizon,
            "max_guidance_weight": graph.max_guidance_weight,
            "prefix_schedule": graph.prefix_schedule, "max_delay": graph.max_delay,
        }  # fmt: skip
    settings = {
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
    if not target_input:  # what the runners check a LatentGuidance's target against
        baked = guidance.target.detach().to("cpu", torch.float32)
        settings["baked_target"] = {"shape": list(baked.shape), "values": baked.flatten().tolist()}
    return settings
