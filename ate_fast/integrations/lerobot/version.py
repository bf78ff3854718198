"""Which LeRobot is installed, and which of its policies ate_fast handles.

The integration replaces LeRobot methods with its own (the sampling loop, the training
loss), written against LeRobot's source at the versions below: another version may
have moved what they rely on, so it is refused with a clear error instead of being
patched blindly. ``ATE_FAST_LEROBOT_ANY_VERSION=1`` lifts the check (at your own risk).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from torch import nn

from ate_fast.errors import UnsupportedPolicyError, UnsupportedVersionError

# the LeRobot releases the integration was written and tested against
SUPPORTED_LEROBOT_VERSIONS = ("0.4.4",)
ANY_VERSION_ENV = "ATE_FAST_LEROBOT_ANY_VERSION"

# LeRobot policy ``name`` -> what ate_fast calls it
POLICY_KINDS = {"diffusion": "diffusion", "smolvla": "smolvla"}
# known LeRobot policies that are not handled, and why
_UNSUPPORTED = {
    "pi0": "LeRobot 0.4.4's PI0Policy needs a patched transformers that cannot be built "
    "offline here, so its integration could not be tested; SmolVLA is the supported "
    "flow-matching VLA",
    "pi05": "not integrated yet (the same flow loop as SmolVLA; needs a patched transformers)",
}


def require_lerobot() -> ModuleType:
    """The imported ``lerobot`` package; raises if it is missing or an untested version."""
    try:
        import lerobot
    except ImportError as exc:
        raise ImportError(
            "ate_fast.integrations.lerobot needs LeRobot: pip install 'lerobot==0.4.4' "
            "(it pins torch < 2.11; see docs/lerobot.md)"
        ) from exc
    version = getattr(lerobot, "__version__", "unknown")
    if version not in SUPPORTED_LEROBOT_VERSIONS and os.environ.get(ANY_VERSION_ENV) != "1":
        raise UnsupportedVersionError(
            f"LeRobot {version} is installed but ate_fast's integration supports LeRobot "
            f"{', '.join(SUPPORTED_LEROBOT_VERSIONS)}: install one of those, or set "
            f"{ANY_VERSION_ENV}=1 to patch anyway (untested)"
        )
    return lerobot


def unwrap(policy: Any) -> Any:
    """The module under the wrappers a training run puts around a policy:
    ``torch.compile``'s (``OptimizedModule._orig_mod``), ``DistributedDataParallel`` /
    ``DataParallel``'s (``.module``: what ``accelerator.prepare`` returns on several GPUs)
    and PEFT's (``PeftModel.get_base_model()``: ``lerobot-train --peft``)."""
    while True:
        if hasattr(policy, "_orig_mod"):
            policy = policy._orig_mod
        elif isinstance(policy, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            policy = policy.module
        elif hasattr(policy, "peft_config") and callable(getattr(policy, "get_base_model", None)):
            policy = policy.get_base_model()
        else:
            return policy


def policy_kind(policy: Any) -> str:
    """``"diffusion"`` or ``"smolvla"`` for a LeRobot policy; raises for anything else."""
    require_lerobot()
    from lerobot.policies.pretrained import PreTrainedPolicy

    policy = unwrap(policy)
    if not isinstance(policy, PreTrainedPolicy):
        raise UnsupportedPolicyError(
            "policy must be a LeRobot policy (a lerobot PreTrainedPolicy such as "
            f"DiffusionPolicy or SmolVLAPolicy), got {type(policy).__name__}"
        )
    name = getattr(policy, "name", None)
    if name in POLICY_KINDS:
        return POLICY_KINDS[name]
    why = _UNSUPPORTED.get(name, "no integration for this policy type")
    raise UnsupportedPolicyError(
        f"policy {type(policy).__name__} (LeRobot name {name!r}) is not supported: {why}. "
        f"Supported: {', '.join(sorted(POLICY_KINDS))}"
    )
