"""How many kernels one flow-transformer block launches per step.

A captured step of the π0-size expert is bound by its kernel count, not by its weights
(the H100 run: the small flow transformer's captured step took ≈ 110 µs per block for
≈ 2 MB of float32 weights, ≈ 30 kernels of a few µs each), so the block's op count is a
performance property worth a test. Counted here: the ATen compute ops a block dispatches
(views and metadata ops excluded), on the CPU — on the GPU each is one kernel, except
that torch's CPU ``rms_norm`` decomposes into 8 ops where CUDA has one fused kernel.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ate_fast.models import make_head
from ate_fast.models.rotary import rotary_tables, rotate

# ops that only make views or change metadata: no kernel
_NO_KERNEL = {
    "view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze",
    "squeeze", "permute", "split", "split_with_sizes", "chunk", "as_strided", "alias",
    "detach", "unbind", "_reshape_alias", "reshape", "lift_fresh", "empty", "empty_strided",
}  # fmt: skip
# per block, 64 prefix tokens: 2 × 6 for the CPU RMSNorms (+ 2 × 2 casts to float32 and
# back in bf16), q/kv/gate_up GEMMs, 3 per rotation (q, k), 2 prefix concatenations,
# attention, the copy of its output's layout, 2 GEMMs with their residual add, GELU and the
# gate product. Were 39 / 43 before the rotation went 7 → 3 ops and the residual adds into
# the GEMMs.
BLOCK_OPS = {torch.float32: 29, torch.bfloat16: 33}


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_forward(depth: int, dtype: torch.dtype) -> collections.Counter:
    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=depth).eval().to(dtype)
    x, t = torch.randn(1, 50, 32), torch.rand(1, 1)
    cache = head.prefix_cache(torch.randn(1, 64, head.config.width))
    features = head.step_features(x, t, cache)[0]
    with torch.no_grad(), _Count() as count:
        head.forward_features(x, features)
    return count.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_per_block(dtype):
    one, two = _ops_of_forward(1, dtype), _ops_of_forward(2, dtype)
    per_block = two - one
    assert sum(per_block.values()) == BLOCK_OPS[dtype], dict(per_block)
    assert "add" not in per_block  # the residuals ride in the output projections' GEMMs
    assert per_block["addmm"] == 2 and per_block["addcmul"] == 2


def test_rotation_is_three_ops_and_exact():
    """The rotate-half rotation through the signed tables equals the textbook formula
    (float64: to the last bit but one) in three ops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 16, generator=gen, dtype=torch.float64)
    angle = torch.rand(7, 8, generator=gen) * 6.0
    cos, sin = rotary_tables(angle, torch.float64)
    with _Count() as count:
        got = rotate(x, cos, sin)
    assert sum(count.ops.values()) == 3, dict(count.ops)
    c, s = angle.cos().double(), angle.sin().double()
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    assert got.is_contiguous()  # the grouped-query fold of the queries stays a view


def test_wrapped_or_hooked_projections_are_called():
    """The residual-in-GEMM reads ``o.weight`` / ``down.weight`` directly only for a plain,
    hook-free nn.Linear: a LoRA-style subclass (its forward adds B·A·x) and a forward hook
    still take effect (float64: the LoRA head equals the head with the merged weight)."""

    class LoRALinear(nn.Linear):
        def __init__(self, base: nn.Linear, rank: int = 2) -> None:
            super().__init__(base.in_features, base.out_features, bias=False, dtype=torch.float64)
            self.weight.data.copy_(base.weight)
            self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=torch.float64))
            self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + (x @ self.lora_a.t()) @ self.lora_b.t()

    torch.manual_seed(0)
    head = make_head("flow-transformer", "small", depth=2).eval().double()
    merged = make_head("flow-transformer", "small", depth=2).eval().double()
    merged.load_state_dict(head.state_dict())
    x, t = torch.randn(1, 50, 32, dtype=torch.float64), torch.rand(1, dtype=torch.float64)
    for block, twin in zip(head.blocks, merged.blocks):
        for name in ("o", "down"):
            lora = LoRALinear(getattr(block, name))
            setattr(block, name, lora)
            with torch.no_grad():
                getattr(twin, name).weight += lora.lora_b @ lora.lora_a
    with torch.no_grad():
        plain = make_head("flow-transformer", "small", depth=2).eval().double()
        plain.load_state_dict(merged.state_dict())
        torch.testing.assert_close(head(x, t), merged(x, t), rtol=1e-12, atol=1e-12)
        calls = []
        plain.blocks[0].o.register_forward_hook(lambda m, i, out: calls.append(1) or 2 * out)
        hooked = plain(x, t)
        assert calls and (hooked - merged(x, t)).abs().max() > 1e-3
