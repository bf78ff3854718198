"""ATE for LeRobot policies: sample with ate_fast, train with Steer, align in their space.

* :func:`patch_policy` — ``DiffusionPolicy`` / ``SmolVLAPolicy`` sample through ate_fast's
  samplers (optionally captured, optionally guided);
* :func:`steer_policy` — their training loss becomes :class:`ate_fast.Steer`'s;
* :func:`vae_spec` / :func:`vae_spec_from_config` — the horizon, padded width, mask and
  normalisation the align VAEs must use (``ate-fast align … --lerobot-policy DIR``).

Needs LeRobot 0.4.4 (``SUPPORTED_LEROBOT_VERSIONS``); see docs/lerobot.md.
"""

from ate_fast.integrations.lerobot.patching import PolicyPatch, patch_policy, steer_policy
from ate_fast.integrations.lerobot.spec import (
    VaeSpec,
    load_lerobot_stats,
    vae_spec,
    vae_spec_from_config,
)
from ate_fast.integrations.lerobot.version import (
    SUPPORTED_LEROBOT_VERSIONS,
    policy_kind,
    require_lerobot,
)

__all__ = [
    "SUPPORTED_LEROBOT_VERSIONS",
    "PolicyPatch",
    "VaeSpec",
    "load_lerobot_stats",
    "patch_policy",
    "policy_kind",
    "require_lerobot",
    "steer_policy",
    "vae_spec",
    "vae_spec_from_config",
]
