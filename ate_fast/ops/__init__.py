"""Fused ops with four backends each (ref, cpu, triton, cuda); see :mod:`ate_fast.ops.backends`.

One folder per op (``guided_step/``, ``mlp_guidance/``: the public op and its
``torch.library`` registration in ``__init__``, ``ref.py``, ``validation.py``,
``dispatch.py``, ``triton.py``); :mod:`ate_fast.ops.constants` mirrors the constants the
C++/CUDA kernels share; :mod:`ate_fast.ops.native_abi` is the native calling convention.

``ate_fast.ops.guided_step`` and ``ate_fast.ops.mlp_guidance`` are the ops' packages (so
``ate_fast.ops.guided_step.prepare_launch`` and ``import ate_fast.ops.guided_step.ref``
resolve); the functions are ``ate_fast.guided_step`` / ``ate_fast.mlp_guidance`` (also
``ate_fast.ops.guided_step.guided_step``).
"""

from ate_fast.ops import backends, constants, guided_step, mlp_guidance, native_abi
from ate_fast.ops.backends import BackendUnavailableError
from ate_fast.ops.constants import FLOAT32_MAX, compute_dtype, effective_clamp
from ate_fast.ops.guided_step import guided_step_reference, selected_backend
from ate_fast.ops.mlp_guidance import mlp_encoder_parts, mlp_guidance_reference

__all__ = [
    "FLOAT32_MAX",
    "BackendUnavailableError",
    "backends",
    "compute_dtype",
    "constants",
    "effective_clamp",
    "guided_step",
    "guided_step_reference",
    "mlp_encoder_parts",
    "mlp_guidance",
    "mlp_guidance_reference",
    "native_abi",
    "selected_backend",
]
