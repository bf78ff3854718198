"""Programmatic dependent launch (PDL) for the package's Triton kernels, where the GPU and
Triton have it (Hopper and later: compute capability 9.0; Triton ≥ 3.4's ``launch_pdl``).

A kernel launched with PDL may start while the kernel before it in the stream is still
running: it must wait (``gdc_wait``, :func:`wait`) before it reads what that kernel wrote
or writes what it reads, and may do only independent work before — reading weights, which
nothing in a step writes. Its predecessor lets it start early by calling
``gdc_launch_dependents``. So the launch flag and the wait in the kernel go together: a
kernel takes a ``PDL`` constexpr that puts the wait in, and both that constexpr and the
launch keyword come from one call, :func:`launch_kwargs` — never one without the other.

Waiting is transitive (the predecessor ends only after its own wait), so a PDL kernel sees
everything before it in the stream done once its wait returns. In a CUDA graph, stream
capture keeps the launch's attribute as a programmatic edge (CUDA ≥ 12.3). The Jetson Orin
(sm_87) has no PDL (ptxas refuses ``griddepcontrol`` below sm_90): there :func:`available`
is false. Triton's interpreter has no grid-dependency ops either: kernels compile the wait
in only where ``PDL`` is true, which it never is on the CPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ate_fast.errors import InvalidArgumentError
from ate_fast.ops import pdl_setting

try:  # Triton ≥ 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: available() is false
    gdc_launch_dependents = gdc_wait = None

MIN_CAPABILITY = (9, 0)


def available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL: a CUDA GPU of compute
    capability ≥ 9.0 and a Triton with the grid-dependency ops and ``launch_pdl``."""
    if device.type != "cuda" or gdc_wait is None or not _triton_launches_pdl():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= MIN_CAPABILITY


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _triton_launches_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - no NVIDIA backend in this Triton
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def for_device(device: torch.device) -> bool:
    """Whether a kernel on ``device`` launches with PDL: ``$ATE_FAST_TRITON_PDL``
    (:mod:`ate_fast.ops.pdl_setting`); ``on`` where :func:`available` is false raises,
    naming the setting and the device."""
    if not pdl_setting.selected():
        return False
    if not available(device):
        raise InvalidArgumentError(
            f"{pdl_setting.ENV_VAR}=on: programmatic dependent launch needs a CUDA GPU of "
            f"compute capability 9.0 or above and Triton 3.4 or later; here: {_where(device)}. "
            f"Unset {pdl_setting.ENV_VAR} (or set it to off)."
        )
    return True


def _where(device: torch.device) -> str:
    if device.type != "cuda" or gdc_wait is None or not _triton_launches_pdl():
        return f"device {device.type}, Triton {triton.__version__}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"


def launch_options(pdl: bool) -> dict:
    """The launch keywords of a kernel compiled with ``PDL=pdl``."""
    return {"launch_pdl": True} if pdl else {}


def launch_kwargs(device: torch.device) -> dict:
    """A launch's ``PDL`` constexpr and its launch keyword, from one :func:`for_device`
    decision: ``kernel[grid](..., **launch_kwargs(x.device))``."""
    pdl = for_device(device)
    return {"PDL": pdl, **launch_options(pdl)}


@triton.jit
def wait():
    """Let the next kernel start, then wait until the kernel before this one has ended and
    its writes are visible (call where the kernel's ``PDL`` constexpr is true)."""
    gdc_launch_dependents()
    gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """``prefetch.global.L2`` of every address in ``ptrs`` (one per 128-byte line is enough);
    returns int32 zeros (an inline asm needs an output; not pure, so it is kept)."""
    return tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
