"""A small MLP policy head, per-timestep or over the flattened chunk.

``flatten=False``: each of the H action vectors goes through the same MLP, with the time
embedding, the optional cond [B, cond_dim] and a learned per-step embedding added to the
first layer (so steps are told apart). ``flatten=True``: one MLP maps the whole chunk
[B, H·D] (with time and cond concatenated) to [B, H·D].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ate_fast.models.head_inputs import check_head_inputs
from ate_fast.models.time_embedding import PI0_PERIODS, sinusoidal_embedding


@dataclass(frozen=True)
class MLPHeadConfig:
    """Sizes of an :class:`MLPHead`; ``depth`` is the number of hidden layers (≥ 1)."""

    horizon: int = 50
    action_dim: int = 32
    hidden: int = 256
    depth: int = 2
    time_dim: int = 32
    cond_dim: int = 0
    flatten: bool = False
    min_period: float = PI0_PERIODS[0]
    max_period: float = PI0_PERIODS[1]
    time_scale: float = 1.0  # multiply t before embedding (e.g. 1e-3 for integer timesteps)

    def __post_init__(self) -> None:
        for name in ("horizon", "action_dim", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPHeadConfig.{name} must be >= 1")


MLP_HEAD_CONFIGS: dict[str, MLPHeadConfig] = {
    "small": MLPHeadConfig(),
    "flat": MLPHeadConfig(hidden=512, flatten=True),
}


class MLPHead(nn.Module):
    """``forward(x [B,H,D], t [B], cond [B, cond_dim] or None) -> [B,H,D]``."""

    def __init__(self, config: Union[str, MLPHeadConfig] = "small", **overrides: Any) -> None:
        super().__init__()
        cfg = MLP_HEAD_CONFIGS[config] if isinstance(config, str) else config
        self.config = cfg = replace(cfg, **overrides)
        context = cfg.time_dim + cfg.cond_dim
        width_in = cfg.horizon * cfg.action_dim if cfg.flatten else cfg.action_dim
        width_out = width_in
        # first layer split in two: the chunk part, and the per-sample context part
        self.input = nn.Linear(width_in, cfg.hidden)
        self.context = nn.Linear(context, cfg.hidden, bias=False)
        self.step = None if cfg.flatten else nn.Parameter(torch.zeros(cfg.horizon, cfg.hidden))
        layers: list[nn.Module] = [nn.SiLU()]
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU()]
        layers.append(nn.Linear(cfg.hidden, width_out))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        cfg = self.config
        cond_shape = (cfg.cond_dim,) if cfg.cond_dim else None
        check_head_inputs(
            "MLPHead", x, t, cond, cfg.horizon, cfg.action_dim, cond_shape,
            cond_required=bool(cfg.cond_dim),
        )  # fmt: skip
        time = sinusoidal_embedding(
            t * cfg.time_scale, cfg.time_dim, cfg.min_period, cfg.max_period
        )
        context = time.to(x.dtype)
        if cfg.cond_dim:
            context = torch.cat([context, cond], dim=-1)
        ctx = self.context(context)  # [B, hidden]
        if cfg.flatten:
            out = self.body(self.input(x.flatten(1)) + ctx)
            return out.view_as(x)
        return self.body(self.input(x) + ctx[:, None, :] + self.step)
