"""The guidance gradient through ``ate_fast.align``'s MLP encoder by the fused kernel.

:func:`ate_fast.mlp_guidance` computes exactly the forward of the ``MLPEncoder`` and
its input-VJP in one call; :class:`~ate_fast.steer.encoder.FrozenEncoder` decides when it
applies. ``ATE_FAST_BACKEND`` still picks the fused op's backend.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ate_fast.ops.mlp_guidance import mlp_guidance


def mlp_fused_gradient(
    parts: tuple,
    x: Tensor,
    *,
    target: Optional[Tensor] = None,
    a0: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    reduction: str = "sample",
) -> Tensor:
    """``g`` [B, H, D] of ``−(1/N)‖E(x) − z*‖²`` (per sample or batch mean), fused.

    ``parts`` is ``(weights, biases, activation)`` (:func:`ate_fast.ops.mlp_encoder_parts`);
    ``z*`` is ``target`` ([d_z] or [B, d_z]) or the latent of ``a0`` [B, H, D].
    """
    weights, biases, activation = parts
    dz = weights[-1].shape[0] // 2
    weight = 1.0 / dz if reduction == "sample" else 1.0 / (x.shape[0] * dz)

    def like_x(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(device=x.device, dtype=x.dtype).contiguous()

    g, _ = mlp_guidance(
        x.contiguous(), weights, biases, activation, target=like_x(target), a0=like_x(a0),
        mask=like_x(mask), eps=like_x(eps), distance_weight=weight,
    )  # fmt: skip
    return g
