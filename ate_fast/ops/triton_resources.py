"""A Triton kernel that a GPU cannot launch, reported as the project's error.

Triton compiles a kernel at its first launch on a device and refuses the launch when the
compiled kernel needs more of a per-block resource (shared memory, or registers × threads)
than the device allows: ``triton.runtime.errors.OutOfResources``, whose message suggests
smaller blocks or fewer pipeline stages — settings a user of ate_fast cannot change. Each
Triton launcher of the package is wrapped by :func:`launch_limits`, which launches on the
data's GPU (Triton launches on the current device: a tensor on another GPU would be read
there) and re-raises it as
:class:`~ate_fast.errors.BackendUnavailableError` naming the path, the kernel's launcher,
the resource with what it needs and what the device allows, and the setting that runs
another path. ``tests/triton_offline_compile.py`` checks every kernel variant's shared
memory against sm_87 / sm_89 / sm_90's limits; a GPU with less per block (Turing: 64 KB)
may still refuse one (the float64 attention backward needs 68 KB).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch
from triton.runtime.errors import OutOfResources

from ate_fast.errors import BackendUnavailableError

Launcher = TypeVar("Launcher", bound=Callable)
# what runs a fused op (guided_step, mlp_guidance) instead of its triton backend
OTHER_BACKEND = (
    "Set ATE_FAST_BACKEND=cuda (the compiled extension) or ref (PyTorch) to run another."
)

# compile options every launch of the package passes (``kernel[grid](..., **COMPILE_OPTIONS)``,
# and tests/triton_offline_compile.py compiles with them): multiplies and adds contracted
# into FMAs, as every GPU measurement so far was taken — Triton 3.9 warns that its default
# turns to no contraction in 3.10 (``TRITON_DEFAULT_FP_FUSION``), which would change the
# kernels' rounding and make their element-wise parts slower without a word
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def sm_count(device: torch.device, interpreted: int) -> int:
    """The SMs of CUDA ``device`` (queried once per GPU: no query in a launch path or a
    capture), or ``interpreted`` — the notional count a launcher sizes its grid by in
    Triton's CPU interpreter."""
    if device.type != "cuda":
        return interpreted
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_limits(path: str, instead: str) -> Callable[[Launcher], Launcher]:
    """Decorate a Triton launcher of ``path`` (e.g. ``ATE_FAST_FLOW_EPILOGUES=triton``):
    Triton's ``OutOfResources`` becomes a :class:`BackendUnavailableError` whose message
    ends with ``instead`` (how to run another path)."""

    def wrap(launcher: Launcher) -> Launcher:
        @functools.wraps(launcher)
        def launch(*args, **kwargs):
            try:
                device = other_gpu(args)
                if device is None:
                    return launcher(*args, **kwargs)
                with torch.cuda.device(device):
                    return launcher(*args, **kwargs)
            except OutOfResources as exc:
                raise BackendUnavailableError(
                    f"{path}: the Triton kernel of {launcher.__name__} needs {exc.required} "
                    f"of {exc.name} per block; {_device()} allows {exc.limit}. {instead}"
                ) from exc

        return launch  # type: ignore[return-value]

    return wrap


def other_gpu(args: tuple) -> Optional[torch.device]:
    """The GPU of the first tensor in ``args`` when it is not the current device, else
    None (≈ 0.5 µs: one device query, only for CUDA data)."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            device = arg.device
            if device.type != "cuda" or device.index is None:
                return None
            return device if device.index != torch.cuda.current_device() else None
    return None


def _device() -> str:
    """The current CUDA device, named."""
    if not torch.cuda.is_available():
        return "this device"
    major, minor = torch.cuda.get_device_capability()
    return f"this GPU ({torch.cuda.get_device_name()}, sm_{major}{minor})"
