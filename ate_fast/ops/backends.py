"""Backend registry: which implementation of a fused op runs for a tensor's device.

Four backends implement every fused op: ``ref`` (plain PyTorch, the definition of
correct), ``cpu`` (C++/OpenMP, ``ate_fast._C``), ``triton`` and ``cuda``
(``ate_fast._C_cuda``). By default the fastest available one for the device runs;
``ATE_FAST_BACKEND=ref|cpu|triton|cuda`` forces one and raises when it cannot run.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from ate_fast import native
from ate_fast.argument_checks import check_choice
from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.version_checks import at_least

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "MIN_TRITON",
    "PREFERENCE",
    "SELECTION_CACHE",
    "BackendUnavailableError",
    "availability",
    "forced_backend",
    "reset_caches",
    "select",
    "support",
    "triton_interpret",
]

BACKENDS = ("ref", "cpu", "triton", "cuda")
# The oldest Triton that runs every kernel here (checked 2026-12-06: the CPU tests through
# its interpreter and the offline compile of every sm_90 variant): Triton 3.0 / 3.1 (torch
# 2.4 / 2.5's) take the modules' string ``tl.constexpr`` annotations (``from __future__
# import annotations``) for run-time arguments — every kernel failed —, and 3.2 – 3.4 have
# no float64 ``tl.dot`` ("Unsupported lhs dtype fp64"). With an older one the Triton paths
# are unavailable: the defaults take the torch and CUDA ones.
MIN_TRITON = "3.5"
ENV_VAR = "ATE_FAST_BACKEND"
# Preference per device type, fastest first (measured: benchmarks/README.md).
PREFERENCE = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}
_NATIVE_MODULE = {"cpu": "_C", "cuda": "_C_cuda"}


# Ops memoise their selection per (device type, dtype, ATE_FAST_BACKEND value) here, so
# that a call costs one dict lookup; reset_caches() clears it.
SELECTION_CACHE: dict = {}


def triton_interpret() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@cache
def _triton_status() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'ate_fast[triton]')"
    try:
        import triton
    except Exception as exc:  # a broken install can raise anything
        return False, f"triton failed to import: {type(exc).__name__}: {exc}"
    try:
        new_enough = at_least(triton.__version__, MIN_TRITON, "Triton")
    except ValueError as exc:
        return False, str(exc)
    if not new_enough:
        return False, (
            f"triton {triton.__version__} is older than {MIN_TRITON}, the oldest that compiles "
            f"this package's kernels (pip install 'triton>={MIN_TRITON}')"
        )
    return True, "ok"


@cache
def _cuda_device_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build"
        return False, "no CUDA GPU visible to torch"
    return True, "ok"


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for running ``backend`` on tensors of ``device_type``."""
    check_choice("backend", backend, BACKENDS)
    if device_type not in PREFERENCE:
        if backend == "ref":
            return True, "ok"
        return False, f"only the ref backend runs on device type {device_type!r}"
    if backend == "ref":
        return _cuda_device_status() if device_type == "cuda" else (True, "ok")
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return False, f"the {backend} backend does not run tensors on {device_type}"
        if device_type == "cuda":
            ok, why = _cuda_device_status()
            if not ok:
                return False, why
        module = _NATIVE_MODULE[backend]
        if native.load(module) is None:
            return False, native.reason(module)
        return True, "ok"
    # triton
    ok, why = _triton_status()
    if not ok:
        return False, why
    if device_type == "cpu" and not triton_interpret():
        return False, "Triton runs on the CPU only through its interpreter (TRITON_INTERPRET=1)"
    if device_type == "cuda":
        ok, why = _cuda_device_status()
        if not ok:
            return False, why
    return True, "ok"


def require_triton(device_type: str, setting: str) -> None:
    """Raise :class:`~ate_fast.errors.BackendUnavailableError` naming ``setting`` (the
    environment setting that chose a Triton path, e.g. ``"ATE_FAST_SKINNY_GEMM=triton"``)
    where Triton cannot run on ``device_type``, with the reason."""
    ok, why = availability("triton", device_type)
    if not ok:
        raise BackendUnavailableError(f"{setting} is unavailable: {why}")


def forced_backend() -> str | None:
    """The backend named by ``ATE_FAST_BACKEND``, or None when unset/empty."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise InvalidArgumentError(
            f"{ENV_VAR} must be one of {', '.join(BACKENDS)} (or unset), got {value!r}"
        )
    return value


Support = tuple  # ((backend, frozenset of device types), ...): hashable, built once per op


def support(**backends: tuple[str, ...]) -> Support:
    """Declare which device types each backend's implementation of an op covers."""
    return tuple(sorted((name, frozenset(devices)) for name, devices in backends.items()))


def select(device_type: str, supported: Support, dtype: torch.dtype | None = None) -> str:
    """The backend to run an op on ``device_type`` (for data of ``dtype``, which
    ``supported`` was chosen by: named in the error when a forced backend lacks it).

    ``supported`` (from :func:`support`) says which device types each backend's
    implementation of this op covers (``ref`` covers every device type). A forced
    backend that cannot run raises :class:`BackendUnavailableError`; otherwise the
    first available backend in :data:`PREFERENCE` wins, and a native
    module that failed to load is reported once by a warning.
    """
    forced = forced_backend()
    if forced is not None:
        return _select_forced(forced, device_type, supported, dtype)
    return _select_auto(device_type, supported)


def _select_forced(
    forced: str, device_type: str, supported: Support, dtype: torch.dtype | None
) -> str:
    if forced == "ref":  # the reference runs wherever torch does
        return forced
    if device_type not in dict(supported).get(forced, frozenset()):
        data = "" if dtype is None else f"{str(dtype).removeprefix('torch.')} "
        raise BackendUnavailableError(
            f"{ENV_VAR}={forced}: this op has no {forced} implementation for {data}"
            f"{device_type} tensors"
        )
    ok, why = availability(forced, device_type)
    if not ok:
        raise BackendUnavailableError(f"{ENV_VAR}={forced} is unavailable: {why}")
    return forced


@cache
def _select_auto(device_type: str, supported: Support) -> str:
    covered = dict(supported)
    for backend in PREFERENCE.get(device_type, ("ref",)):
        if backend == "ref":
            break
        if device_type not in covered.get(backend, frozenset()):
            continue
        ok, _ = availability(backend, device_type)
        if ok:
            return backend
        if (
            backend in _NATIVE_MODULE
            and backend == device_type
            and native.load(_NATIVE_MODULE[backend]) is None
            and (device_type != "cuda" or _cuda_device_status()[0])
        ):
            native.warn_fallback(_NATIVE_MODULE[backend], backend)
    return "ref"


def reset_caches() -> None:
    """Forget cached availability and selections (tests; after changing the environment)."""
    _triton_status.cache_clear()
    _cuda_device_status.cache_clear()
    _select_auto.cache_clear()
    SELECTION_CACHE.clear()
