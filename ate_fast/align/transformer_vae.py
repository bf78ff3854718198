"""The paper's skip-connected Transformer action VAE (encoder and decoder).

Both halves are U-Net-like stacks of ``2k+1`` post-norm Transformer layers: ``k`` input
layers, one middle layer, ``k`` output layers; before output layer ``j`` the current
sequence is concatenated with the input layer's output it mirrors and projected back to
``d_model`` (the "concatenation skip"); a final LayerNorm closes the stack.

Encoder: tokens ``[μ-token, logσ²-token, proj(a_1), …, proj(a_H)]`` plus learned
positions → skip stack → the first two outputs are ``μ`` and ``log σ²`` (one latent token
of ``d_model`` values; a linear head maps it to ``latent_dim`` when the two differ).

Decoder: ``H`` zero queries plus learned positions attend to themselves and cross-attend
to the single latent token (plus its learned position) → skip stack → linear to ``D``.

Paper size (``d_model=512, heads=4, ff=1024, 9 layers``): about 52M parameters, 21M of
them in the encoder.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ate_fast.align.action_mask import apply_mask
from ate_fast.align.activations import get_activation

_INIT_STD = 0.02  # learned tokens and positions start small, like BERT/ViT embeddings


def _check_layers(num_layers: int) -> int:
    if num_layers < 1 or num_layers % 2 == 0:
        raise ValueError(
            f"num_layers: expected an odd number >= 1 (k in, 1 middle, k out), got {num_layers}"
        )
    return (num_layers - 1) // 2


class _SkipStack(nn.Module):
    """``k`` input layers, a middle layer, ``k`` output layers with concat skips, final norm."""

    def __init__(self, make_layer, d_model: int, num_layers: int) -> None:
        super().__init__()
        k = _check_layers(num_layers)
        self.input_blocks = nn.ModuleList(make_layer() for _ in range(k))
        self.middle_block = make_layer()
        self.output_blocks = nn.ModuleList(make_layer() for _ in range(k))
        self.skip_projections = nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(k))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, memory: Optional[Tensor] = None) -> Tensor:
        call = (
            (lambda layer, h: layer(h)) if memory is None else (lambda layer, h: layer(h, memory))
        )
        skips = []
        for layer in self.input_blocks:
            x = call(layer, x)
            skips.append(x)
        x = call(self.middle_block, x)
        for layer, proj in zip(self.output_blocks, self.skip_projections):
            x = proj(torch.cat([x, skips.pop()], dim=-1))
            x = call(layer, x)
        return self.norm(x)


class TransformerEncoder(nn.Module):
    """``[B, H, D]`` → ``(μ [B, d_z], log σ² [B, d_z])``."""

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        latent_dim: int,
        d_model: int = 512,
        num_heads: int = 4,
        ff_dim: int = 1024,
        num_layers: int = 9,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        act = get_activation(activation)
        self.action_dim, self.horizon, self.latent_dim = action_dim, horizon, latent_dim
        self.input_proj = nn.Linear(action_dim, d_model)
        self.dist_tokens = nn.Parameter(torch.randn(2, d_model) * _INIT_STD)
        self.positions = nn.Parameter(torch.randn(horizon + 2, d_model) * _INIT_STD)
        self.blocks = _SkipStack(
            lambda: nn.TransformerEncoderLayer(
                d_model, num_heads, ff_dim, dropout, act, batch_first=True
            ),
            d_model,
            num_layers,
        )
        same = latent_dim == d_model
        self.mu_head = nn.Identity() if same else nn.Linear(d_model, latent_dim)
        self.logvar_head = nn.Identity() if same else nn.Linear(d_model, latent_dim)

    def forward(self, a: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        x = self.input_proj(apply_mask(a, mask))  # [B, H, d]
        tokens = self.dist_tokens.unsqueeze(0).expand(a.shape[0], -1, -1)
        h = self.blocks(torch.cat([tokens, x], dim=1) + self.positions)
        return self.mu_head(h[:, 0]), self.logvar_head(h[:, 1])


class TransformerDecoder(nn.Module):
    """``z [B, d_z]`` → ``[B, H, D]`` (H learned-position queries cross-attending to z)."""

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        latent_dim: int,
        d_model: int = 512,
        num_heads: int = 4,
        ff_dim: int = 1024,
        num_layers: int = 9,
        dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        act = get_activation(activation)
        self.action_dim, self.horizon = action_dim, horizon
        self.latent_proj = (
            nn.Identity() if latent_dim == d_model else nn.Linear(latent_dim, d_model)
        )
        self.memory_position = nn.Parameter(torch.randn(1, d_model) * _INIT_STD)
        self.query_positions = nn.Parameter(torch.randn(horizon, d_model) * _INIT_STD)
        self.blocks = _SkipStack(
            lambda: nn.TransformerDecoderLayer(
                d_model, num_heads, ff_dim, dropout, act, batch_first=True
            ),
            d_model,
            num_layers,
        )
        self.output_proj = nn.Linear(d_model, action_dim)

    def forward(self, z: Tensor) -> Tensor:
        memory = self.latent_proj(z).unsqueeze(1) + self.memory_position  # [B, 1, d]
        queries = self.query_positions.unsqueeze(0).expand(z.shape[0], -1, -1)  # zeros + pos
        return self.output_proj(self.blocks(queries, memory))
