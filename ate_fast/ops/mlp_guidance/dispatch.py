"""Which implementation of the fused MLP guidance runs, and how each is called: ``ref``
(forward ops), ``cpu`` (``ate_fast._C``), ``cuda`` (``ate_fast._C_cuda``, one
cooperative kernel) and ``triton`` (2·L kernels). Each writes ``g`` and ``z`` in place."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ate_fast import native
from ate_fast.argument_checks import env_choice
from ate_fast.ops import backends
from ate_fast.ops.constants import ACTIVATIONS
from ate_fast.ops.mlp_guidance.ref import mlp_guidance_reference
from ate_fast.ops.mlp_guidance.validation import (
    validate,
    validate_gradient_out,
    validate_latent_out,
)
from ate_fast.ops.native_abi import current_stream, dtype_code, ptr
from ate_fast.ops.overlap import overlaps, overlaps_any

SUPPORT = {
    torch.float32: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float64: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float16: backends.support(triton=("cuda",), cuda=("cuda",)),
    torch.bfloat16: backends.support(cpu=("cpu",), triton=("cuda",), cuda=("cuda",)),
}
# The CUDA kernel's loop unroll depth (weight loads in flight per thread): "4", the kernel
# measured so far, or "16" (the same adds in the same order; never run on a GPU). Read per
# call, so that a benchmark can A/B the two in one process.
UNROLL_VAR = "ATE_FAST_MLP_GUIDANCE_UNROLL"
UNROLLS = ("4", "16")

# Above this batch size the op-by-op decomposition (cuBLAS / MKL GEMMs) beats the fused
# kernels, which are built for control-rate batches (measured: benchmarks/README.md).
FUSED_MAX_BATCH = 16


def native_args(x, weights, biases, activation, target, a0, mask, eps, distance_weight, g, z
                ) -> tuple:  # fmt: skip
    """The argument list of the native ``mlp_guidance`` entry points (CPU and CUDA; CUDA
    appends scratch, device index and stream)."""
    dims = [x.shape[1] * x.shape[2]] + [w.shape[0] for w in weights]
    dz = dims[-1] // 2
    return (
        dtype_code(x.dtype), x.shape[0], dims, [w.data_ptr() for w in weights],
        [ptr(b) for b in biases], activation, x.data_ptr(), ptr(a0), ptr(target),
        dz if target is not None and target.ndim == 2 else 0, ptr(mask),
        x.shape[2] if mask is not None and mask.ndim == 2 else 0, x.shape[2], ptr(eps),
        float(distance_weight), g.data_ptr(), z.data_ptr(),
    )  # fmt: skip


def _run_ref(x, weights, biases, activation, target, a0, mask, eps, distance_weight, g, z):
    with torch.no_grad():  # parameters may require grad; the result is a constant
        rg, rz = mlp_guidance_reference(
            x, weights, biases, ACTIVATIONS[activation], target, a0, mask, eps, distance_weight
        )
    g.copy_(rg)
    z.copy_(rz)


def _run_cpu(*args) -> None:
    native.load("_C").mlp_guidance(*native_args(*args))


def _run_cuda(*args) -> None:
    x, a0 = args[0], args[5]
    module = native.load("_C_cuda")
    arguments = native_args(*args)
    elems = module.mlp_guidance_scratch_elements(x.shape[0], arguments[2], a0 is not None)
    # Scratch for the activations (stays in L2); from the caching allocator, so graph-safe.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scratch = torch.empty(elems, dtype=compute, device=x.device)
    module.mlp_guidance(
        *arguments,
        scratch.data_ptr(),
        elems,
        x.device.index,
        current_stream(x.device),
        cuda_unroll(),
    )


def cuda_unroll() -> int:
    """The CUDA kernel's unroll depth, ``$ATE_FAST_MLP_GUIDANCE_UNROLL`` (4 where unset; 16)."""
    if not os.environ.get(UNROLL_VAR):  # unset: one dict lookup per eager call
        return int(UNROLLS[0])
    return int(env_choice(UNROLL_VAR, UNROLLS))


def _run_triton(x, weights, biases, activation, target, a0, mask, eps, distance_weight, g, z):
    from ate_fast.ops.mlp_guidance.triton import mlp_guidance_triton_into  # triton is optional

    mlp_guidance_triton_into(
        g, z, x, weights, biases, activation, target, a0, mask, eps, distance_weight
    )


def _outputs_overlap(g, z, args: tuple) -> bool:
    """True if the destinations share memory with an input or with each other."""
    x, weights, biases, _, target, a0, mask, eps, _ = args
    inputs = (x, target, a0, mask, eps, *weights, *biases)
    return overlaps(g, z) or overlaps_any(g, inputs) or overlaps_any(z, inputs)


IMPLEMENTATIONS = {"ref": _run_ref, "cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


def selected_backend(x) -> str:
    """The backend :func:`ate_fast.mlp_guidance` runs for ``x`` (honours
    ``ATE_FAST_BACKEND``; unforced, batches above :data:`FUSED_MAX_BATCH` take ``ref``)."""
    device_type = "cuda" if x.is_cuda else x.device.type
    forced = backends.forced_backend()
    large = forced is None and x.shape[0] > FUSED_MAX_BATCH
    key = ("mlp_guidance", device_type, x.dtype, forced, large)
    backend = backends.SELECTION_CACHE.get(key)
    if backend is None:
        supported = SUPPORT.get(x.dtype, ())
        backend = "ref" if large else backends.select(device_type, supported, x.dtype)
        backends.SELECTION_CACHE[key] = backend
    return backend


def mlp_guidance_into(g, z, x, weights, biases, activation, target, a0, mask, eps,
                      distance_weight, backend: Optional[str] = None, *,
                      fresh_out: bool = False) -> None:  # fmt: skip
    """Validate, then write ``g`` [B, H, D] and ``z`` [B, d_z] with ``backend``.

    ``g`` and ``z`` may share memory with an input or with each other: the result is
    then computed into temporaries and copied (the kernels read every input in full
    while writing their outputs). ``fresh_out=True`` (newly allocated ``g`` and ``z``)
    skips that check."""
    validate(x, weights, biases, activation, target, a0, mask, eps, distance_weight)
    if backend is None:
        backend = selected_backend(x)
    args = (x, weights, biases, activation, target, a0, mask, eps, distance_weight)
    if not fresh_out:  # caller-given destinations: check them
        validate_gradient_out(g, x)
        validate_latent_out(z, x, weights[-1].shape[0] // 2)
    if not fresh_out and _outputs_overlap(g, z, args):
        g_tmp, z_tmp = torch.empty_like(g), torch.empty_like(z)
        IMPLEMENTATIONS[backend](*args, g_tmp, z_tmp)
        g.copy_(g_tmp)
        z.copy_(z_tmp)
        return
    IMPLEMENTATIONS[backend](*args, g, z)
