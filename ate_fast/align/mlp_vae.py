"""The MLP action-chunk encoder and decoder.

The encoder is what the fused guidance kernel targets, so it is deliberately plain: the
chunk ``[B, H, D]`` (masked dims zeroed) is flattened to ``[B, H·D]`` and goes through
``layers`` (``nn.Linear`` only) with ``activation`` between them, not after the last; the
last layer gives ``2·d_z`` values, ``concat(μ, log σ²)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import Tensor, nn

from ate_fast.align.action_mask import apply_mask
from ate_fast.align.activations import get_activation

DEFAULT_HIDDEN_DIMS = (512, 512)


def _linear_stack(dims: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))


class MLPEncoder(nn.Module):
    """``[B, H, D]`` (or already flattened ``[B, H·D]``) → ``(μ [B, d_z], log σ² [B, d_z])``.

    Attributes:
        layers: ``nn.ModuleList`` of ``nn.Linear``: ``H·D → hidden[0] → … → 2·d_z``.
        activation: name of the activation between layers (see ``activations.ACTIVATIONS``).
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self._act = get_activation(activation)
        self.activation = activation
        self.action_dim, self.horizon, self.latent_dim = action_dim, horizon, latent_dim
        self.in_features = horizon * action_dim
        self.layers = _linear_stack([self.in_features, *hidden_dims, 2 * latent_dim])

    def forward(self, a: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if a.dim() == 3 and tuple(a.shape[1:]) == (self.horizon, self.action_dim):
            x = apply_mask(a, mask).flatten(1)
        elif a.dim() == 2 and a.shape[1] == self.in_features and mask is None:
            x = a
        else:
            raise ValueError(
                f"a: expected [B, H, D]=[B, {self.horizon}, {self.action_dim}] or flattened "
                f"[B, {self.in_features}] (no mask), got {tuple(a.shape)}"
            )
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self._act(x)
        mu, logvar = x.chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """``z [B, d_z]`` → ``[B, H, D]``; hidden sizes mirror the encoder's."""

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self._act = get_activation(activation)
        self.activation = activation
        self.action_dim, self.horizon = action_dim, horizon
        self.layers = _linear_stack([latent_dim, *reversed(hidden_dims), horizon * action_dim])

    def forward(self, z: Tensor) -> Tensor:
        x = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self._act(x)
        return x.view(z.shape[0], self.horizon, self.action_dim)
