"""The action space a LeRobot policy predicts, as the align VAEs must see it.

ATE's VAEs must embed exactly the chunks the policy outputs: the same horizon, the same
(padded) action width with the padding masked, the same normalisation. Per policy type:

==============  ============  =====================  =================  ==================
policy          horizon H     action width D         mask               normalisation
==============  ============  =====================  =================  ==================
diffusion       ``horizon``   the action feature's   none               ``MIN_MAX`` → [−1, 1]
                (past steps
                included)
smolvla         ``chunk_size`` ``max_action_dim``    1 on the first     ``MEAN_STD``
                              (32; zero-padded)      D_r dims
==============  ============  =====================  =================  ==================

(the normalisation is the policy config's ``normalization_mapping["ACTION"]``; the table
lists LeRobot's defaults). Diffusion Policy's chunk starts ``n_obs_steps − 1`` steps in
the past and ``select_action`` executes ``[n_obs_steps − 1, n_obs_steps − 1 +
n_action_steps)``: the VAE sees the whole chunk, as the policy's loss does.

This module reads a live policy (``vae_spec(policy)``) or a saved one's ``config.json``
(``vae_spec_from_config``, no LeRobot import: the align CLI uses it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ate_fast.data.normalization import Normalizer
from ate_fast.errors import DataFormatError, UnsupportedPolicyError
from ate_fast.integrations.lerobot.version import POLICY_KINDS, policy_kind, unwrap

_DEFAULT_MODES = {"diffusion": "MIN_MAX", "smolvla": "MEAN_STD"}


@dataclass(frozen=True)
class VaeSpec:
    """The chunks a LeRobot policy predicts.

    Attributes:
        policy_type: ``"diffusion"`` or ``"smolvla"``.
        horizon: H, the chunk length the policy samples (and is trained on).
        action_dim: D, the action width the policy samples (SmolVLA: ``max_action_dim``).
        raw_action_dim: D_r, the robot's action width (the first D_r of the D dims).
        normalization: LeRobot's mode for the action (``"MIN_MAX"``, ``"MEAN_STD"``, …).
        executed: ``(start, stop)``, the slice of the chunk ``select_action`` executes.
    """

    policy_type: str
    horizon: int
    action_dim: int
    raw_action_dim: int
    normalization: str
    executed: tuple[int, int]

    @property
    def dims(self) -> list[int]:
        """Where the robot's D_r dims sit in D (the align CLI's ``--dims``)."""
        return list(range(self.raw_action_dim))

    def mask(self) -> Optional[Tensor]:
        """The action mask ``[D]`` (1 on the robot's dims) or None when D = D_r. Pass it
        to ``ActionVAE``'s training (the align CLI does) and to ``Steer(..., mask=)`` /
        ``LatentGuidance(..., mask=)``: without it guidance leaks into padded dims."""
        if self.raw_action_dim == self.action_dim:
            return None
        mask = torch.zeros(self.action_dim)
        mask[: self.raw_action_dim] = 1.0
        return mask

    def normalizer(self, stats: dict[str, Any], eps: float = 1e-8) -> Normalizer:
        """The policy's action normalisation from LeRobot dataset statistics.

        ``stats``: the dataset's ``meta/stats.json`` content (its ``"action"`` entry is
        used) or that entry itself; ``eps`` is LeRobot's normaliser epsilon.
        """
        entry = stats.get("action", stats)
        if not isinstance(entry, dict):
            raise DataFormatError(
                f"stats['action'] must be a dict of statistics, got {type(entry).__name__}"
            )
        normalizer = Normalizer.from_lerobot_stats(self.normalization, entry, eps)
        if normalizer.dim != self.raw_action_dim:
            raise DataFormatError(
                f"the action statistics have {normalizer.dim} dims but the policy's action "
                f"feature has {self.raw_action_dim}"
            )
        return normalizer


def _mode(value: Any) -> str:
    """A NormalizationMode enum or its string value -> the string (``"MIN_MAX"``)."""
    return str(getattr(value, "value", value))


def _spec(policy_type: str, config: Any, get: Any) -> VaeSpec:
    """``get(config, name)`` reads a config field (a dataclass or a JSON dict)."""
    raw = int(get(config, "action_dim"))
    modes = get(config, "normalization_mapping") or {}
    mode = _mode(modes.get("ACTION", _DEFAULT_MODES[policy_type]))
    steps = int(get(config, "n_action_steps"))
    if policy_type == "diffusion":
        start = int(get(config, "n_obs_steps")) - 1
        horizon = int(get(config, "horizon"))
        return VaeSpec(policy_type, horizon, raw, raw, mode, (start, start + steps))
    horizon, width = int(get(config, "chunk_size")), int(get(config, "max_action_dim"))
    if raw > width:
        raise UnsupportedPolicyError(
            f"the action feature has {raw} dims but max_action_dim is {width}"
        )
    return VaeSpec(policy_type, horizon, width, raw, mode, (0, steps))


def _live_field(config: Any, name: str) -> Any:
    if name == "action_dim":
        return config.action_feature.shape[0]
    return getattr(config, name)


def vae_spec(policy: Any) -> VaeSpec:
    """The :class:`VaeSpec` of a LeRobot ``DiffusionPolicy`` or ``SmolVLAPolicy``."""
    kind = policy_kind(policy)
    return _spec(kind, unwrap(policy).config, _live_field)


def _json_field(config: dict[str, Any], name: str) -> Any:
    if name == "action_dim":
        features = config.get("output_features", {})
        action = features.get("action")
        if not action or "shape" not in action:
            raise DataFormatError("the policy config has no output_features.action.shape")
        return action["shape"][0]
    if name not in config:
        raise DataFormatError(f"the policy config has no {name!r}")
    return config[name]


def vae_spec_from_config(path: Union[str, Path]) -> VaeSpec:
    """The :class:`VaeSpec` from a saved LeRobot policy: its directory (with
    ``config.json``, as ``save_pretrained`` writes it) or the ``config.json`` itself."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise DataFormatError(f"{file}: no LeRobot policy config.json there")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{file}: not valid JSON ({exc})") from exc
    kind = POLICY_KINDS.get(config.get("type"))
    if kind is None:
        raise UnsupportedPolicyError(
            f"{file}: policy type {config.get('type')!r} is not supported (supported: "
            f"{', '.join(sorted(POLICY_KINDS))})"
        )
    return _spec(kind, config, _json_field)


def load_lerobot_stats(dataset: Union[str, Path]) -> dict[str, Any]:
    """A LeRobot dataset's ``meta/stats.json`` (the statistics its policies normalise with)."""
    file = Path(dataset) / "meta" / "stats.json"
    if not file.is_file():
        raise DataFormatError(
            f"{dataset}: no meta/stats.json (a LeRobot dataset directory is expected)"
        )
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{file}: not valid JSON ({exc})") from exc
