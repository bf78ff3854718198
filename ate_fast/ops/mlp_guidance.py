"""Fused MLP-encoder latent guidance: encoder forward, latent distance gradient and the
backward to the input in one call (ATE's per-step hot path).

    g = ∇_x y(x),   y(x) = −scale·‖z(x) − z*‖²  per sample,
    z(x) = μ(mask ⊙ x)  (+ exp(log σ²/2) ⊙ ε with ``eps``),   z* = target or z(a0)

for the plain MLP encoder of :mod:`ate_fast.align` (``Linear`` layers with one
activation between them; the last layer gives ``concat(μ, log σ²)``). ``scale = 1/d_z`` is
the paper's per-sample mean; ``1/(B·d_z)`` the released code's batch mean. The result is a
constant for the training loss (no gradient flows through it).

Backends: ``ref`` (forward ops only, the ONNX-exportable decomposition), ``cpu`` (C++,
blocked GEMV/GEMM with OpenMP, float32/float64), ``cuda`` (one cooperative kernel,
float32/float64/float16/bfloat16 with float32 accumulation), ``triton`` (2·L kernels
for L layers — a GEMM per layer and direction with bias/activation/latent epilogues —
:mod:`ate_fast.ops.mlp_guidance_triton`; CUDA after ``cuda`` in preference, float32/
float64/float16/bfloat16, and on the CPU float32/float64 only through
``TRITON_INTERPRET=1`` and ``ATE_FAST_BACKEND=triton``; float32/float64 tested on an H100).
Registered as ``torch.ops.ate_fast.mlp_guidance``.
"""

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ate_fast import native
from ate_fast.ops import backends
from ate_fast.ops.guided_step import _DTYPE_CODE
from ate_fast.ops.mlp_guidance_ref import ACTIVATIONS, mlp_guidance_reference

_SUPPORT = {
    torch.float32: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float64: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float16: backends.support(triton=("cuda",), cuda=("cuda",)),
    torch.bfloat16: backends.support(triton=("cuda",), cuda=("cuda",)),
}
MAX_LAYERS = 16


def mlp_encoder_parts(
    module: nn.Module,
) -> Optional[tuple[list[Tensor], list[Optional[Tensor]], str]]:
    """``(weights, biases, activation)`` if ``module`` (or its ``.encoder``) is a plain MLP
    encoder the fused kernel implements, else None.

    Recognised: a module with ``layers`` (``nn.ModuleList`` of ``nn.Linear`` only, ≤ 16)
    and ``activation`` (a name in gelu/silu/relu/tanh) whose forward applies the activation
    between layers and returns ``(μ, log σ²)`` halves of the last layer — the contract of
    ``ate_fast.align``'s ``MLPEncoder``.
    """
    encoder = getattr(module, "encoder", module)
    layers = getattr(encoder, "layers", None)
    activation = getattr(encoder, "activation", None)
    if not isinstance(layers, nn.ModuleList) or activation not in ACTIVATIONS:
        return None
    if not 1 <= len(layers) <= MAX_LAYERS or not all(type(m) is nn.Linear for m in layers):
        return None
    if layers[-1].out_features % 2:
        return None
    return [m.weight for m in layers], [m.bias for m in layers], activation


# ---------------------------------------------------------------- validation
def _validate(x, weights, biases, activation, target, a0, mask, eps, scale) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"mlp_guidance: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(
            f"mlp_guidance: x must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )
    if x.ndim != 3:
        raise ValueError(f"mlp_guidance: x must be [B, H, D], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("mlp_guidance: x must be contiguous")
    if activation not in range(len(ACTIVATIONS)):
        raise ValueError(f"mlp_guidance: activation code must be 0..{len(ACTIVATIONS) - 1}")
    if not 1 <= len(weights) <= MAX_LAYERS or len(biases) != len(weights):
        raise ValueError(
            f"mlp_guidance: 1..{MAX_LAYERS} weights and as many biases (None allowed) expected, "
            f"got {len(weights)} weights and {len(biases)} biases"
        )
    batch, features = x.shape[0], x.shape[1] * x.shape[2]
    width = features
    for i, (w, b) in enumerate(zip(weights, biases)):
        if not isinstance(w, Tensor) or w.ndim != 2 or w.shape[1] != width:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"mlp_guidance: weights[{i}] must be [out, {width}], got {got}")
        _same("weights", i, w, x)
        width = w.shape[0]
        if b is not None:
            if not isinstance(b, Tensor) or tuple(b.shape) != (width,):
                raise ValueError(f"mlp_guidance: biases[{i}] must be [{width}] or None")
            _same("biases", i, b, x)
    if width % 2:
        raise ValueError(f"mlp_guidance: the last layer must output 2·d_z values, got {width}")
    dz = width // 2
    if (target is None) == (a0 is None):
        raise ValueError("mlp_guidance: give exactly one of target (z*) and a0 (z* = E(a0))")
    if target is not None and tuple(target.shape) not in ((dz,), (batch, dz)):
        raise ValueError(
            f"mlp_guidance: target must be [d_z] = [{dz}] or [B, d_z] = [{batch}, {dz}], "
            f"got {tuple(target.shape)}"
        )
    if a0 is not None and a0.shape != x.shape:
        raise ValueError(
            f"mlp_guidance: a0 must have x's shape {tuple(x.shape)}, got {tuple(a0.shape)}"
        )
    if mask is not None and tuple(mask.shape) not in ((x.shape[2],), (batch, x.shape[2])):
        raise ValueError(
            f"mlp_guidance: mask must be [D] = [{x.shape[2]}] or [B, D], got {tuple(mask.shape)}"
        )
    if eps is not None and tuple(eps.shape) != (batch, dz):
        raise ValueError(
            f"mlp_guidance: eps must be [B, d_z] = [{batch}, {dz}], got {tuple(eps.shape)}"
        )
    for name, t in (("target", target), ("a0", a0), ("mask", mask), ("eps", eps)):
        if t is not None:
            _same(name, None, t, x)
    if not math.isfinite(scale):
        raise ValueError(f"mlp_guidance: scale must be finite, got {scale}")


def _same(name: str, index: Optional[int], t: Tensor, x: Tensor) -> None:
    label = name if index is None else f"{name}[{index}]"
    if t.dtype != x.dtype:
        raise TypeError(f"mlp_guidance: {label} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"mlp_guidance: {label} must be on x's device {x.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"mlp_guidance: {label} must be contiguous")


# ---------------------------------------------------------------- backends
def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _native_args(x, weights, biases, activation, target, a0, mask, eps, scale, g, z) -> tuple:
    dims = [x.shape[1] * x.shape[2]] + [w.shape[0] for w in weights]
    dz = dims[-1] // 2
    return (
        _DTYPE_CODE[x.dtype], x.shape[0], dims, [w.data_ptr() for w in weights],
        [_ptr(b) for b in biases], activation, x.data_ptr(), _ptr(a0), _ptr(target),
        dz if target is not None and target.ndim == 2 else 0, _ptr(mask),
        x.shape[2] if mask is not None and mask.ndim == 2 else 0, x.shape[2], _ptr(eps),
        float(scale), g.data_ptr(), z.data_ptr(),
    )  # fmt: skip


def _run_ref(x, weights, biases, activation, target, a0, mask, eps, scale, g, z) -> None:
    with torch.no_grad():  # parameters may require grad; the result is a constant
        rg, rz = mlp_guidance_reference(
            x, weights, biases, ACTIVATIONS[activation], target, a0, mask, eps, scale
        )
    g.copy_(rg)
    z.copy_(rz)


def _run_cpu(*args) -> None:
    native.load("_C").mlp_guidance(*_native_args(*args))


def _run_cuda(*args) -> None:
    from ate_fast.ops.guided_step import _current_stream

    x, a0 = args[0], args[5]
    module = native.load("_C_cuda")
    native_args = _native_args(*args)
    elems = module.mlp_guidance_scratch_elements(x.shape[0], native_args[2], a0 is not None)
    # Scratch for the activations (stays in L2); from the caching allocator, so graph-safe.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scratch = torch.empty(elems, dtype=compute, device=x.device)
    module.mlp_guidance(
        *native_args, scratch.data_ptr(), elems, x.device.index, _current_stream(x.device)
    )


def _run_triton(x, weights, biases, activation, target, a0, mask, eps, scale, g, z) -> None:
    from ate_fast.ops.mlp_guidance_triton import mlp_guidance_triton_into

    mlp_guidance_triton_into(g, z, x, weights, biases, activation, target, a0, mask, eps, scale)


IMPLEMENTATIONS = {"ref": _run_ref, "cpu": _run_cpu, "cuda": _run_cuda, "triton": _run_triton}


# Above this batch size the op-by-op decomposition (cuBLAS / MKL GEMMs) beats the fused
# kernels, which are built for control-rate batches (measured: benchmarks/README.md).
FUSED_MAX_BATCH = 16


def selected_backend(x: Tensor) -> str:
    """The backend :func:`mlp_guidance` runs for ``x`` (honours ATE_FAST_BACKEND)."""
    device_type = "cuda" if x.is_cuda else x.device.type
    forced = backends.forced_backend()
    large = forced is None and x.shape[0] > FUSED_MAX_BATCH
    key = ("mlp_guidance", device_type, x.dtype, forced, large)
    backend = backends.SELECTION_CACHE.get(key)
    if backend is None:
        backend = "ref" if large else backends.select(device_type, _SUPPORT.get(x.dtype, ()))
        backends.SELECTION_CACHE[key] = backend
    return backend


def mlp_guidance_into(g, z, x, weights, biases, activation, target, a0, mask, eps, scale,
                      backend: Optional[str] = None) -> None:  # fmt: skip
    """Validate, then write ``g`` [B, H, D] and ``z`` [B, d_z] with ``backend``."""
    _validate(x, weights, biases, activation, target, a0, mask, eps, scale)
    if g.shape != x.shape or g.dtype != x.dtype or g.device != x.device or not g.is_contiguous():
        raise ValueError("mlp_guidance: g must be a contiguous tensor like x")
    if backend is None:
        backend = selected_backend(x)
    IMPLEMENTATIONS[backend](x, weights, biases, activation, target, a0, mask, eps, scale, g, z)


# ---------------------------------------------------------------- torch.library
@torch.library.custom_op(
    "ate_fast::mlp_guidance",
    mutates_args=(),
    schema="(Tensor x, Tensor[] weights, Tensor?[] biases, int activation, Tensor? target, "
    "Tensor? a0, Tensor? mask, Tensor? eps, float scale) -> (Tensor, Tensor)",
)
def _mlp_guidance_op(x, weights, biases, activation, target, a0, mask, eps, scale):
    g = torch.empty_like(x)
    z = x.new_empty((x.shape[0], weights[-1].shape[0] // 2))
    mlp_guidance_into(g, z, x, weights, biases, activation, target, a0, mask, eps, scale)
    return g, z


@_mlp_guidance_op.register_fake
def _(x, weights, biases, activation, target, a0, mask, eps, scale):
    _validate(x, weights, biases, activation, target, a0, mask, eps, scale)
    return torch.empty_like(x), x.new_empty((x.shape[0], weights[-1].shape[0] // 2))


# ---------------------------------------------------------------- public API
def mlp_guidance(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activation: str = "gelu",
    *,
    target: Optional[Tensor] = None,
    a0: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Fused guidance gradient through an MLP encoder.

    Args:
        x: ``[B, H, D]`` the point where the gradient is taken (noisy chunk / sample).
        weights, biases: the encoder's ``nn.Linear`` parameters in order (``W_l`` is
            ``[out, in]``, the first ``in`` is ``H·D``, the last ``out`` is ``2·d_z``);
            see :func:`mlp_encoder_parts`.
        activation: ``"gelu"`` (exact erf), ``"silu"``, ``"relu"`` or ``"tanh"``.
        target: z*, ``[d_z]`` or ``[B, d_z]``; or
        a0: ``[B, H, D]`` clean chunk, z* = z(a0) computed in the same call (training).
        mask: action-dim mask ``[D]`` or ``[B, D]`` applied to the encoder input.
        eps: ``[B, d_z]`` reparameterisation noise (``latent="sample"``), shared by x and a0.
        scale: ``1/d_z`` (per-sample mean, the paper) or ``1/(B·d_z)`` (batch mean).

    Returns:
        ``(g [B, H, D], z [B, d_z])``: the gradient of ``y`` w.r.t. ``x`` and ``x``'s latent.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"mlp_guidance: activation must be one of {ACTIVATIONS}, got {activation!r}"
        )
    args = (x, list(weights), list(biases), ACTIVATIONS.index(activation), target, a0, mask, eps,
            float(scale))  # fmt: skip
    tensors = (x, target, a0, mask, eps, *args[1], *args[2])
    if not torch.compiler.is_compiling() and all(
        t is None or type(t) is Tensor or isinstance(t, nn.Parameter) for t in tensors
    ):
        g = torch.empty_like(x)
        z = x.new_empty((x.shape[0], args[1][-1].shape[0] // 2)) if args[1] else x.new_empty(0)
        mlp_guidance_into(g, z, *args)
        return g, z
    return torch.ops.ate_fast.mlp_guidance(*args)
