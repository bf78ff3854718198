"""Counting the ATen ops a block of code dispatches (tests' helper)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as seen: ...``; then ``seen.ops["addmm"]``: how many times each op
    ran, by its name without namespace or overload (``aten.addmm.default`` → ``addmm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).split(".")[-1]] += 1
        return func(*args, **(kwargs or {}))
