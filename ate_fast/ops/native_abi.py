"""The calling convention of the native kernels, public so that hot loops can hold a
prepared launch instead of going through an op's validation and dispatch on every call.

Every native entry point (``ate_fast._C`` on the CPU, ``ate_fast._C_cuda``) takes raw
pointers as Python ints (0 for an absent tensor), sizes, a dtype code
(:data:`ate_fast.ops.constants.DTYPE_CODES`) and, on CUDA, a device index and the raw
``cudaStream_t``. The ops build these argument lists after validating their tensors;
:class:`PreparedLaunch` keeps one such list and re-binds the pointers that change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor

from ate_fast.ops.constants import DTYPE_CODES


def ptr(t: Optional[Tensor]) -> int:
    """``t``'s data pointer as an int, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def dtype_code(dtype: torch.dtype) -> int:
    """The native ``DType`` code of ``dtype`` (KeyError for a dtype no kernel takes)."""
    return DTYPE_CODES[dtype]


def current_stream(device: torch.device) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device``, as an int."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # ~10x cheaper; inductor uses it
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


class PreparedLaunch:
    """One validated native call whose argument list is kept, with named tensor slots
    that can be re-bound to other tensors of the same shape, dtype and device.

    ``kernel(*args)`` is the native entry point; ``slots`` maps a name to ``(index, like)``:
    the position of that tensor's pointer in ``args`` and the tensor it was prepared with.
    :meth:`accepts` says whether a tensor may fill a slot without a new validation;
    ``launch(**tensors)`` re-binds the named slots and calls the kernel.
    """

    __slots__ = ("args", "kernel", "slots")

    def __init__(
        self, kernel: Callable[..., None], args: Sequence, slots: dict[str, tuple[int, Tensor]]
    ) -> None:
        self.kernel = kernel
        self.args = list(args)
        self.slots = {name: (index, _Like(like)) for name, (index, like) in slots.items()}

    def accepts(self, name: str, t: Optional[Tensor]) -> bool:
        """Whether ``t`` has the shape, dtype and device slot ``name`` was prepared with
        and is contiguous (the kernel reads it as one flat array)."""
        slot = self.slots.get(name)
        return slot is not None and t is not None and slot[1].matches(t)

    def checker(self, name: str) -> Callable[[Tensor], bool]:
        """``accepts(name, ·)`` as one bound call (for a loop that checks every launch)."""
        return self.slots[name][1].matches

    def bound(self, *names: str) -> Callable[..., None]:
        """A positional fast path for a replay loop: ``bound("m", "g")(m, g)`` re-binds
        those slots and runs the kernel, with no keyword or slot lookup per call."""
        args, kernel = self.args, self.kernel
        indexes = tuple(self.slots[name][0] for name in names)
        if len(indexes) == 1:  # the common cases without a per-call loop
            (i,) = indexes

            def run_one(t: Tensor) -> None:
                args[i] = t.data_ptr()
                kernel(*args)

            return run_one
        if len(indexes) == 2:
            i, j = indexes

            def run_two(t: Tensor, u: Tensor) -> None:
                args[i] = t.data_ptr()
                args[j] = u.data_ptr()
                kernel(*args)

            return run_two

        def run(*tensors: Tensor) -> None:
            for index, t in zip(indexes, tensors):
                args[index] = t.data_ptr()
            kernel(*args)

        return run

    def __call__(self, **tensors: Tensor) -> None:
        args = self.args
        for name, t in tensors.items():
            args[self.slots[name][0]] = t.data_ptr()
        self.kernel(*args)


class _Like:
    """Shape, dtype and device of a slot's example tensor."""

    __slots__ = ("device", "dtype", "shape")

    def __init__(self, t: Tensor) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    def matches(self, t: Tensor) -> bool:
        return (
            t.shape == self.shape
            and t.dtype == self.dtype
            and t.device == self.device
            and t.is_contiguous()
        )
