"""Whether a module's parameters alone say what it computes.

Fast paths read a layer's weights instead of calling it — the fused MLP-guidance kernel,
the hand-written input-VJPs of the reference heads and of the paper's Transformer encoder,
the heads' folded / split first layers. That is exact only for plain layers: a wrapper or
subclass whose forward adds to the product (a LoRA adapter, a quantization wrapper) or a
forward hook that changes the output would be skipped silently. These checks decide
whether such a path may run; where they fail, the module is called (or autograd used).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module

# the packages whose modules compute what their parameters say (no hidden extra terms)
_PLAIN_PACKAGES = ("torch.nn.", "ate_fast.")


def forward_hooks_active(module: nn.Module) -> bool:
    """Whether calling ``module``'s methods directly would skip a forward (pre-)hook: its
    own, or a module-wide one (``nn.modules.module.register_module_forward_hook``)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(torch_module, "_global_forward_hooks", None)
        or getattr(torch_module, "_global_forward_pre_hooks", None)
    )


def plain_linear(linear: nn.Module) -> bool:
    """``linear`` is an ``nn.Linear`` itself (not a subclass) with no forward hooks, so
    ``F.linear(x, linear.weight, linear.bias)`` is what calling it computes."""
    return type(linear) is nn.Linear and not forward_hooks_active(linear)


def plain_rms_norm(norm: nn.Module) -> bool:
    """``norm`` is an ``nn.RMSNorm`` itself with no forward hooks (its weight, if any, is
    all it adds to ``F.rms_norm``)."""
    return type(norm) is nn.RMSNorm and not forward_hooks_active(norm)


def plain_tree(module: nn.Module) -> bool:
    """No forward hooks on ``module`` or below it (module-wide ones included), and every
    submodule below it is a ``torch.nn`` or ``ate_fast`` class (one pass over the modules,
    ≈ 0.25 µs each: 1.5 µs for the align MLP encoder, ≈ 35 µs for the π0-size expert)."""
    if forward_hooks_active(module):
        return False
    stack = list(module._modules.values())  # a walk of its own: module.modules() costs 2×
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if not type(m).__module__.startswith(_PLAIN_PACKAGES):
            return False
        stack.extend(m._modules.values())
    return True
