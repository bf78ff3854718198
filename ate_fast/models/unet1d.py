"""Diffusion Policy's temporal U-Net with FiLM conditioning (our own implementation).

The chunk [B, H, D] is treated as D channels over H steps. A sinusoidal embedding of the
timestep goes through Linear -> Mish -> Linear; concatenated with the global ``cond``
[B, cond_dim] it conditions every residual block by FiLM (a per-channel scale and bias
after the block's first convolution). Down path: per level two residual blocks, then a
stride-2 convolution (not after the last level); two middle blocks; up path mirrors the
down path with skip concatenations and transposed-convolution upsampling; a final
convolution block and a 1×1 convolution back to D channels. The convolutions are
:class:`~ate_fast.models.chunk_conv.ChunkConv1d` / ``ChunkConvTranspose1d``: ``nn`` layers
that run as one row-major GEMM at batch 1 on the CPU, where ATen's own path is slow.

:meth:`ConditionalUnet1D.step_features` computes the FiLM scales and biases of every
block from (t, cond) for N steps at once (the samplers compute them once per call:
:mod:`ate_fast.sampling.step_features`); :meth:`ConditionalUnet1D.forward_features`
runs the convolutions with them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ate_fast.models.chunk_conv import ChunkConv1d, ChunkConvTranspose1d
from ate_fast.models.head_inputs import check_head_inputs, in_dtype
from ate_fast.models.time_embedding import DIFFUSION_PERIODS, sinusoidal_embedding

# One step's FiLM modulation: per residual block (in forward order), (scale, bias) [B, C, 1].
Modulation = list[tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class UnetConfig:
    """Sizes of a :class:`ConditionalUnet1D`. ``horizon`` must be divisible by
    ``2**(len(down_dims) − 1)``."""

    horizon: int = 16
    action_dim: int = 2
    cond_dim: int = 0
    down_dims: tuple[int, ...] = (256, 512, 1024)
    time_embed_dim: int = 256
    kernel_size: int = 5
    n_groups: int = 8
    min_period: float = DIFFUSION_PERIODS[0]
    max_period: float = DIFFUSION_PERIODS[1]
    time_scale: float = 1.0  # multiply t before embedding (e.g. 1e3 for flow time in [0, 1])

    def __post_init__(self) -> None:
        if not self.down_dims:
            raise ValueError("UnetConfig.down_dims must name at least one level")
        if any(d % self.n_groups for d in self.down_dims):
            raise ValueError(
                f"every down dim must be divisible by n_groups={self.n_groups}, got "
                f"{self.down_dims}"
            )
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ValueError(
                f"horizon ({self.horizon}) must be divisible by {factor} for "
                f"{len(self.down_dims)} levels"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")


UNET_CONFIGS: dict[str, UnetConfig] = {
    # Diffusion Policy's CNN on PushT-image-like sizes: H = 16, D = 2, a global condition of
    # 2 observation steps × (512 image features + 2 state dims).
    "dp": UnetConfig(cond_dim=1028),
    "small": UnetConfig(cond_dim=32, down_dims=(32, 64, 128), time_embed_dim=64),
}


def _conv_block(c_in: int, c_out: int, kernel: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        ChunkConv1d(c_in, c_out, kernel, padding=kernel // 2),
        nn.GroupNorm(groups, c_out),
        nn.Mish(),
    )


class _FiLMResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv1 = _conv_block(c_in, c_out, kernel, groups)
        self.conv2 = _conv_block(c_out, c_out, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = ChunkConv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, film: tuple[Tensor, Tensor]) -> Tensor:
        """``x`` [B, C_in, H] with this block's FiLM ``(scale, bias)`` [B, C_out, 1] each."""
        scale, bias = film
        h = self.conv2(scale * self.conv1(x) + bias)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Diffusion Policy U-Net: ``forward(x [B,H,D], t [B], cond [B, cond_dim]) -> [B,H,D]``.

    ``t`` is the integer diffusion timestep (any real dtype; scale flow time with
    ``time_scale``). ``cond`` is required when ``cond_dim > 0`` (None raises
    ``MissingConditionError``); must be None when 0.
    """

    def __init__(self, config: Union[str, UnetConfig] = "small", **overrides: Any) -> None:
        super().__init__()
        cfg = UNET_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg = replace(cfg, **overrides)
        e, k, grp = cfg.time_embed_dim, cfg.kernel_size, cfg.n_groups
        self.time_mlp = nn.Sequential(nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e))
        film_dim = e + cfg.cond_dim
        dims = (cfg.action_dim, *cfg.down_dims)
        levels = len(cfg.down_dims)

        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == levels - 1
            self.down.append(
                nn.ModuleList([
                    _FiLMResidualBlock(c_in, c_out, film_dim, k, grp),
                    _FiLMResidualBlock(c_out, c_out, film_dim, k, grp),
                    nn.Identity() if last else ChunkConv1d(c_out, c_out, 3, stride=2, padding=1),
                ])
            )  # fmt: skip
        mid = cfg.down_dims[-1]
        self.mid = nn.ModuleList([_FiLMResidualBlock(mid, mid, film_dim, k, grp) for _ in range(2)])
        self.up = nn.ModuleList()
        # every up level upsamples (levels − 1 of them, one per downsample); as in Diffusion
        # Policy the first level's skip is not used, the deepest one is.
        for c_in, c_out in reversed(list(zip(dims[1:-1], dims[2:]))):
            self.up.append(
                nn.ModuleList([
                    _FiLMResidualBlock(2 * c_out, c_in, film_dim, k, grp),
                    _FiLMResidualBlock(c_in, c_in, film_dim, k, grp),
                    ChunkConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                ])
            )  # fmt: skip
        start = cfg.down_dims[0]
        self.final = nn.Sequential(
            _conv_block(start, start, k, grp), ChunkConv1d(start, cfg.action_dim, 1)
        )

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        self._check(x, t, cond)
        return self.forward_features(x, self._modulations(t[None], cond)[0])

    def step_features(
        self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None
    ) -> list[Modulation]:
        """Every block's FiLM ``(scale, bias)`` [B, C, 1] at N times ``t`` [N, B] (the time
        MLP and each block's FiLM layer run once on all N·B rows); ``x`` [B, H, D] (the
        sample) is only checked. ``forward_features(x, features[k])`` is
        ``forward(x, t[k], cond)``."""
        if t.ndim != 2:
            raise ValueError(f"ConditionalUnet1D: t must have shape [N, B], got {tuple(t.shape)}")
        self._check(x, t[0], cond)
        return self._modulations(t, cond)

    def forward_features(self, x: Tensor, features: Modulation) -> Tensor:
        """The U-Net on ``x`` [B, H, D] with one step's FiLM ``features``
        (:meth:`step_features`)."""
        films = iter(features)
        h = x.to(self.final[-1].weight.dtype).transpose(1, 2)  # [B, D, H]: channels over time
        skips = []
        for block1, block2, downsample in self.down:
            h = block1(h, next(films))
            h = block2(h, next(films))
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, next(films))
        for block1, block2, upsample in self.up:
            h = block1(torch.cat([h, skips.pop()], dim=1), next(films))
            h = upsample(block2(h, next(films)))
        return self.final(h).transpose(1, 2).to(x.dtype)

    def film_blocks(self) -> list[nn.Module]:
        """The FiLM residual blocks in forward order (what a step's features are for)."""
        down = [block for level in self.down for block in level[:2]]
        up = [block for level in self.up for block in level[:2]]
        return [*down, *self.mid, *up]

    def _check(self, x: Tensor, t: Tensor, cond: Optional[Tensor]) -> None:
        cfg = self.config
        check_head_inputs(
            "ConditionalUnet1D", x, t, cond, cfg.horizon, cfg.action_dim,
            (cfg.cond_dim,) if cfg.cond_dim else None, cond_required=bool(cfg.cond_dim),
            weight_dtype=self.final[-1].weight.dtype,
        )  # fmt: skip

    def _modulations(self, t: Tensor, cond: Optional[Tensor]) -> list[Modulation]:
        """Per row of ``t`` [N, B]: every block's FiLM (scale, bias) [B, C, 1]."""
        cfg = self.config
        dtype = self.final[-1].weight.dtype  # the compute dtype (mixed precision: bf16/fp16)
        steps, batch = t.shape
        emb = sinusoidal_embedding(
            t.reshape(-1) * cfg.time_scale, cfg.time_embed_dim, cfg.min_period, cfg.max_period
        ).to(dtype)
        film = self.time_mlp(emb)
        if cfg.cond_dim:
            film = torch.cat([film, in_dtype(cond, dtype).repeat(steps, 1)], dim=-1)
        film = self.film_blocks()[0].film[0](film)  # every block's FiLM starts with this Mish
        per_block = []
        for block in self.film_blocks():
            scale, bias = block.film[1](film).view(steps, batch, -1, 1).chunk(2, dim=2)
            per_block.append((scale.unbind(0), bias.unbind(0)))
        return [[(scale[k], bias[k]) for scale, bias in per_block] for k in range(steps)]
