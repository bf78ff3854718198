"""``make_head(name, config, **overrides)``: the reference heads by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ate_fast.argument_checks import check_choice
from ate_fast.errors import ArgumentTypeError
from ate_fast.models.flow_transformer import FLOW_TRANSFORMER_CONFIGS, FlowTransformerHead
from ate_fast.models.mlp_head import MLP_HEAD_CONFIGS, MLPHead
from ate_fast.models.unet1d import UNET_CONFIGS, ConditionalUnet1D

HEADS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "flow-transformer": (FlowTransformerHead, FLOW_TRANSFORMER_CONFIGS),
    "unet1d": (ConditionalUnet1D, UNET_CONFIGS),
    "mlp": (MLPHead, MLP_HEAD_CONFIGS),
}


def make_head(name: str, config: Any = "small", **overrides: Any) -> nn.Module:
    """Build a reference head: ``name`` in :data:`HEADS` (``"flow-transformer"``,
    ``"unet1d"``, ``"mlp"``); ``config`` a named config of that head (e.g. ``"pi0-expert"``,
    ``"dp"``, ``"small"``) or a config object; ``overrides`` replace config fields
    (``horizon=16, action_dim=7``). Build on the meta device to count parameters without
    allocating: ``with torch.device("meta"): make_head(...)``."""
    cls, configs = HEADS[check_choice("name", name, tuple(HEADS))]
    if isinstance(config, str):
        check_choice(f"config for {name!r}", config, tuple(configs))
    else:
        config_type = type(next(iter(configs.values())))
        if not isinstance(config, config_type):
            raise ArgumentTypeError(
                f"config for {name!r} must be one of {tuple(configs)} or a "
                f"{config_type.__name__}, got {type(config).__name__}"
            )
    return cls(config, **overrides)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
