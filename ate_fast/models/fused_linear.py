"""A bias-free linear layer and the residual add after it as one GEMM, when that is safe.

``residual + linear(x)`` is a GEMM and an element-wise add; ``addmm(residual, x, Wᵀ)`` is
one GEMM with the residual as its C operand (one kernel and one rounding fewer — a
captured step launches each op as a kernel). Reading ``linear.weight`` directly skips the
module call, so it is done only when nothing would notice: a plain ``nn.Linear`` (not a
subclass, e.g. a LoRA or quantized wrapper, whose forward computes something else) with
no bias, no forward hooks on it or module-wide, outside autocast (which would round the
residual to the GEMM's precision), with the residual in the weight's dtype. Otherwise the
module is called and the residual added, as written.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module


def forward_hooks_active(module: nn.Module) -> bool:
    """Whether calling ``module``'s methods directly would skip a forward (pre-)hook: its
    own, or a module-wide one (``nn.modules.module.register_module_forward_hook``)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(torch_module, "_global_forward_hooks", None)
        or getattr(torch_module, "_global_forward_pre_hooks", None)
    )


def linear_residual(linear: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """``residual + linear(x)`` [..., out] for ``x`` [..., in] and ``residual`` [..., out]
    (module docstring: one GEMM where that is safe, else the two ops)."""
    weight = getattr(linear, "weight", None)
    if (
        type(linear) is not nn.Linear
        or linear.bias is not None
        or forward_hooks_active(linear)
        or residual.dtype != weight.dtype
        or torch.is_autocast_enabled(residual.device.type)
    ):
        return residual + linear(x)
    out = torch.addmm(residual.reshape(-1, weight.shape[0]), x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(residual.shape)
