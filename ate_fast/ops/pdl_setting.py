"""``ATE_FAST_TRITON_PDL=off|on``: whether the flow-transformer block's Triton kernels (the
few-row GEMM and its slices' sum, the forward's and the input-VJP's epilogues, the gemm
attention's softmax and its gradient, the split-key attention's kernels, the persistent
MLP, the Transformer encoder's kernels) launch with
programmatic dependent launch (:mod:`ate_fast.ops.triton_pdl`; Hopper and later —
elsewhere a launch raises). Off where unset. Read without importing Triton (``ate-fast
info``, the tuner's checks)."""

from __future__ import annotations

import os

from ate_fast.argument_checks import env_choice

ENV_VAR = "ATE_FAST_TRITON_PDL"
CHOICES = ("off", "on")


def selected() -> bool:
    """Whether ``$ATE_FAST_TRITON_PDL`` is ``on`` (anything but off / on raises, naming it)."""
    if not os.environ.get(ENV_VAR):  # unset: one dict lookup per launch
        return False
    return env_choice(ENV_VAR, CHOICES) == "on"
