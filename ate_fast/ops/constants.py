"""Constants shared with the native and Triton kernels: the Python mirror of
``csrc/include/ate_fast/constants.h`` (``tests/test_ops_constants.py`` parses the header
and fails if the two disagree), and the compute-dtype rule every backend follows.
"""

from __future__ import annotations

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

# The most Linear layers the fused MLP guidance kernels take (``kMaxMlpLayers``).
MAX_MLP_LAYERS = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every fused op computes in for data of ``dtype``: float64 for float64,
    float32 otherwise (half types are widened on load and rounded once on store)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
