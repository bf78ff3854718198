"""Constants shared with the native and Triton kernels: the Python mirror of
``csrc/include/ate_fast/constants.h`` (``tests/test_ops_constants.py`` parses the header
and fails if the two disagree), and the compute-dtype rule every backend follows.
"""

from __future__ import annotations

import math

import torch

# torch dtype -> the ``DType`` code of the native entry points.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}

# MLP encoder activations in ``Activation`` code order: code = ACTIVATIONS.index(name).
ACTIVATIONS: tuple[str, ...] = ("gelu", "silu", "relu", "tanh")
# "no activation" where a Triton kernel's activation is optional (the few-row GEMM's
# epilogue); Python-only, the native kernels always apply one.
NO_ACTIVATION = -1

# The most Linear layers the fused MLP guidance kernels take (``kMaxMlpLayers``).
MAX_MLP_LAYERS = 16


# κ (clamp) at or above float32's largest finite value means "no clamp" on every backend
# (the float32 kernels could not represent it; float64 data follows the same rule).
FLOAT32_MAX = 3.4028234663852886e38


def effective_clamp(clamp: float) -> float:
    """κ as the kernels take it: ``math.inf`` for any κ ≥ :data:`FLOAT32_MAX` (no clamp),
    else ``clamp`` unchanged (NaN and negative values are left for validation)."""
    clamp = float(clamp)
    return math.inf if clamp >= FLOAT32_MAX else clamp


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every fused op computes in for data of ``dtype``: float64 for float64,
    float32 otherwise (half types are widened on load and rounded once on store)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
