"""The fused guided step: every sampler update and steer correction in ate_fast.

    out = a·x + b·(m + λ·clamp(c·g, −κ, κ)) + d·m_prev + s·z

Shapes: ``x, m, g, m_prev, z`` are ``[B, H, D]`` (any ``[B, ...]`` works: the op is
elementwise within a batch row); ``a, b, c, d, s`` are ``[B]`` so that each sample can
sit at its own timestep; ``λ`` (``lam``) and ``κ`` (``kappa``) are scalars. Every
tensor but ``m`` is optional and an absent one drops its term. How the samplers use it
(``m`` is the model output, ``g`` the guidance gradient, ``c`` the parameterisation's
guidance coefficient from ATE_METHOD.md):

============================  ==========================================================
DDIM (η ≥ 0), ε-prediction    x_prev = a·x + b·ε̂ + s·z,  a = √(ᾱ'/ᾱ),
                              b = √(1−ᾱ'−σ²) − √(ᾱ'(1−ᾱ)/ᾱ),  s = σ
DDPM posterior                x_prev = a·x + b·ε̂ + s·z (a, b from the posterior mean)
DPM-Solver++(2M)              first x̂0 = a·x + b·ε̂ (conversion, guidance applied here),
                              then x' = a·x + b·x̂0 + d·x̂0_prev (the multistep update)
flow Euler (openpi)           x' = x + Δt·v̂  (a = 1, b = Δt < 0)
steer correction (training)   pred + λ·clamp(c·g, −κ, κ)   (x absent, b = 1)
============================  ==========================================================

where ε̂ = m + λ·clamp(c·g, −κ, κ) is the guided model output.

Backends: ``ref`` (PyTorch), ``cpu`` (C++/OpenMP; float32, float64), ``triton``
(float32, float16, bfloat16), ``cuda`` (float32, float64, float16, bfloat16). Half
types compute in float32, float64 in float64. The op is registered as
``torch.ops.ate_fast.guided_step`` (functional, differentiable) and
``torch.ops.ate_fast.guided_step_out`` (writes into ``out``; CUDA-graph friendly).
"""

import math
import os
from typing import Optional, Union

import torch
from torch import Tensor

from ate_fast import native
from ate_fast.ops import backends
from ate_fast.ops.guided_step_ref import compute_dtype, guided_step_reference

Coefficient = Union[Tensor, float]

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_SUPPORT = {
    torch.float32: backends.support(cpu=("cpu",), triton=("cpu", "cuda"), cuda=("cuda",)),
    torch.float64: backends.support(cpu=("cpu",), cuda=("cuda",)),
    torch.float16: backends.support(triton=("cuda",), cuda=("cuda",)),
    torch.bfloat16: backends.support(triton=("cuda",), cuda=("cuda",)),
}
_DATA_ARGS = ("x", "g", "m_prev", "z")


# ---------------------------------------------------------------------------------
# validation (metadata only, so it also runs on fake tensors while tracing)
# ---------------------------------------------------------------------------------
def _check_data(name: str, t: Tensor, m: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"guided_step: {name} must be a torch.Tensor or None, got {type(t).__name__}"
        )
    if t.shape != m.shape:
        raise ValueError(
            f"guided_step: {name} must have the shape of m {tuple(m.shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != m.dtype:
        raise TypeError(f"guided_step: {name} must have m's dtype {m.dtype}, got {t.dtype}")
    if t.device != m.device:
        raise ValueError(f"guided_step: {name} must be on m's device {m.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(
            f"guided_step: {name} must be contiguous (the fused kernels read it as one flat "
            f"array), got strides {t.stride()}; call .contiguous() first"
        )


def _check_coefficient(name: str, t: Tensor, m: Tensor) -> None:
    expected = compute_dtype(m.dtype)
    if not isinstance(t, Tensor):
        raise TypeError(f"guided_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (m.shape[0],):
        raise ValueError(
            f"guided_step: {name} must have shape [B] = [{m.shape[0]}] (one value per batch "
            f"element), got {tuple(t.shape)}"
        )
    if t.dtype != expected:
        raise TypeError(
            f"guided_step: {name} must be {expected} (the compute dtype for {m.dtype} data), "
            f"got {t.dtype}"
        )
    if t.device != m.device:
        raise ValueError(f"guided_step: {name} must be on m's device {m.device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"guided_step: {name} must be contiguous, got stride {t.stride()}")


def _validate(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa) -> None:
    """Raise a ValueError/TypeError naming the first bad argument."""
    if _well_formed(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa):
        return
    _explain(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)


def _well_formed(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa) -> bool:
    """The common case in one cheap pass (a per-step call must not pay for messages)."""
    if not isinstance(m, Tensor):
        return False
    dtype = m.dtype
    if dtype not in _DTYPE_CODE or m.ndim < 1 or not m.is_contiguous():
        return False
    shape, device = m.shape, m.device
    cshape, cdtype = shape[:1], compute_dtype(dtype)
    for t, k in ((x, a), (g, c), (m_prev, d), (z, s)):
        if t is None:
            if k is not None:
                return False
            continue
        if not (
            isinstance(t, Tensor) and t.shape == shape and t.dtype == dtype
            and t.device == device and t.is_contiguous()
        ):  # fmt: skip
            return False
        if not _coefficient_ok(k, cshape, cdtype, device):
            return False
    return (
        _coefficient_ok(b, cshape, cdtype, device)
        and math.isfinite(lam)
        and kappa >= 0  # False for NaN
    )


def _coefficient_ok(k, cshape, cdtype, device) -> bool:
    return (
        isinstance(k, Tensor) and k.shape == cshape and k.dtype == cdtype
        and k.device == device and k.is_contiguous()
    )  # fmt: skip


def _explain(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa) -> None:
    if not isinstance(m, Tensor):
        raise TypeError(f"guided_step: m must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype not in _DTYPE_CODE:
        raise TypeError(
            f"guided_step: m must be float32, float64, float16 or bfloat16, got {m.dtype}"
        )
    if m.ndim < 1:
        raise ValueError("guided_step: m must have a batch dimension ([B, H, D]), got a scalar")
    if not m.is_contiguous():
        raise ValueError(
            f"guided_step: m must be contiguous, got strides {m.stride()}; call .contiguous() first"
        )
    for name, tensor, coef_name, coef in (
        ("x", x, "a", a), ("g", g, "c", c), ("m_prev", m_prev, "d", d), ("z", z, "s", s)
    ):  # fmt: skip
        if tensor is None:
            if coef is not None:
                raise ValueError(f"guided_step: {coef_name} was given but {name} is None")
            continue
        _check_data(name, tensor, m)
        if coef is None:
            raise ValueError(
                f"guided_step: {name} was given, so its coefficient {coef_name} is required"
            )
        _check_coefficient(coef_name, coef, m)
    _check_coefficient("b", b, m)
    if not math.isfinite(lam):
        raise ValueError(f"guided_step: lam must be finite, got {lam}")
    if math.isnan(kappa) or kappa < 0:
        raise ValueError(f"guided_step: kappa must be >= 0 (inf disables the clamp), got {kappa}")
    raise ValueError("guided_step: inconsistent arguments")  # unreachable if the checks agree


# ---------------------------------------------------------------------------------
# backends: each writes into a preallocated out
# ---------------------------------------------------------------------------------
def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _native_args(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa) -> tuple:
    batch = m.shape[0]
    row = m.numel() // batch if batch else 0
    return (
        _DTYPE_CODE[m.dtype], batch, row, out.data_ptr(), _ptr(x), m.data_ptr(), _ptr(g),
        _ptr(m_prev), _ptr(z), _ptr(a), b.data_ptr(), _ptr(c), _ptr(d), _ptr(s),
        float(lam), float(kappa),
    )  # fmt: skip


def _into_ref(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa) -> None:
    out.copy_(guided_step_reference(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa))


def _into_cpu(out, *args) -> None:
    native.load("_C").guided_step(*_native_args(out, *args))


def _current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``, as an int."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # ~10x cheaper; inductor uses it
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _into_cuda(out, *args) -> None:
    device = out.device
    native.load("_C_cuda").guided_step(
        *_native_args(out, *args), device.index, _current_stream(device)
    )


def _into_triton(out, *args) -> None:
    from ate_fast.ops.guided_step_triton import guided_step_triton_into

    guided_step_triton_into(out, *args)


IMPLEMENTATIONS = {"ref": _into_ref, "cpu": _into_cpu, "cuda": _into_cuda, "triton": _into_triton}


def selected_backend(m: Tensor) -> str:
    """The backend :func:`guided_step` would run for data like ``m`` (honours ATE_FAST_BACKEND)."""
    device_type = "cuda" if m.is_cuda else m.device.type
    key = ("guided_step", device_type, m.dtype, os.environ.get(backends.ENV_VAR))
    backend = backends.SELECTION_CACHE.get(key)
    if backend is None:
        backend = backends.select(device_type, _SUPPORT.get(m.dtype, ()))
        backends.SELECTION_CACHE[key] = backend
    return backend


def guided_step_into(out: Tensor, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa,
                     backend: Optional[str] = None) -> Tensor:  # fmt: skip
    """Validate, then write the guided step into ``out`` [B, ...] with ``backend``
    (default: :func:`selected_backend`). Returns ``out``."""
    _validate(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)
    if out is not m and not (
        out.shape == m.shape and out.dtype == m.dtype and out.device == m.device
        and out.is_contiguous()
    ):  # fmt: skip
        _check_data("out", out, m)
    if backend is None:
        backend = selected_backend(m)
    IMPLEMENTATIONS[backend](out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)
    return out


# ---------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------
_ARGS = (
    "Tensor? x, Tensor m, Tensor? a, Tensor b, Tensor? g, Tensor? c, Tensor? m_prev, "
    "Tensor? d, Tensor? z, Tensor? s, float lam, float kappa"
)


@torch.library.custom_op("ate_fast::guided_step", mutates_args=(), schema=f"({_ARGS}) -> Tensor")
def _guided_step_op(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa):
    out = torch.empty_like(m, memory_format=torch.contiguous_format)
    return guided_step_into(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)


@_guided_step_op.register_fake
def _(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa):
    _validate(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)
    return torch.empty_like(m, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "ate_fast::guided_step_out", mutates_args=("out",), schema=f"(Tensor(a!) out, {_ARGS}) -> ()"
)
def _guided_step_out_op(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa):
    guided_step_into(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)


@_guided_step_out_op.register_fake
def _(out, x, m, a, b, g, c, m_prev, d, z, s, lam, kappa):
    _validate(x, m, a, b, g, c, m_prev, d, z, s, lam, kappa)
    _check_data("out", out, m)


def _setup_context(ctx, inputs, output) -> None:
    x, m, a, b, g, c, m_prev, d, z, s, lam, kappa = inputs
    ctx.save_for_backward(x, m, a, b, g, c, m_prev, d, z, s)
    ctx.lam, ctx.kappa = lam, kappa


def _sum_rows(t: Tensor) -> Tensor:
    """[B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


_INPUTS = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s")


def _backward(ctx, grad: Tensor):
    """Only the gradients autograd asks for (``ctx.needs_input_grad``): in a Steer loss that
    is ``m`` alone: one multiply instead of every input's gradient and its row sums."""
    x, m, a, b, g, c, m_prev, d, z, s = ctx.saved_tensors
    lam, kappa = ctx.lam, ctx.kappa
    need = dict(zip(_INPUTS, ctx.needs_input_grad))
    cd = compute_dtype(m.dtype)
    n = m.ndim

    def rows(coef):
        return coef.reshape(-1, *([1] * (n - 1)))

    gc = grad.to(cd)
    grads = dict.fromkeys(_INPUTS)
    if need["m"]:
        grads["m"] = (rows(b) * gc).to(m.dtype)
    if g is not None and (need["g"] or need["c"] or need["b"]):
        u = rows(c) * g.to(cd)
        inside = ((u >= -kappa) & (u <= kappa)).to(cd)  # torch.clamp's subgradient
        through = rows(b) * gc * lam * inside
        if need["g"]:
            grads["g"] = (through * rows(c)).to(g.dtype)
        if need["c"]:
            grads["c"] = _sum_rows(through * g.to(cd))
    if need["b"]:
        corrected = m.to(cd)
        if g is not None:
            corrected = corrected + lam * torch.clamp(u, -kappa, kappa)
        grads["b"] = _sum_rows(gc * corrected)
    for name, tensor, coef_name, coef in (
        ("x", x, "a", a),
        ("m_prev", m_prev, "d", d),
        ("z", z, "s", s),
    ):
        if tensor is None:
            continue
        if need[name]:
            grads[name] = (rows(coef) * gc).to(tensor.dtype)
        if need[coef_name]:
            grads[coef_name] = _sum_rows(gc * tensor.to(cd))
    return (*(grads[k] for k in _INPUTS), None, None)


_guided_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------
def _coefficient(name: str, value: Optional[Coefficient], m: Tensor) -> Optional[Tensor]:
    if value is None or isinstance(value, Tensor):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full(
            (m.shape[0],), float(value), dtype=compute_dtype(m.dtype), device=m.device
        )
    raise TypeError(
        f"guided_step: {name} must be a [B] tensor or a float, got {type(value).__name__}"
    )


def _plain(*tensors: Optional[Tensor]) -> bool:
    """True when the call can skip the torch.library dispatcher: eager, no autograd,
    no tensor subclasses (fake / functional tensors take the registered op)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or (grad and t.requires_grad):
            return False
    return True


def guided_step(
    x: Optional[Tensor],
    m: Tensor,
    *,
    a: Optional[Coefficient] = None,
    b: Coefficient = 1.0,
    g: Optional[Tensor] = None,
    c: Optional[Coefficient] = None,
    lam: float = 1.0,
    kappa: float = math.inf,
    m_prev: Optional[Tensor] = None,
    d: Optional[Coefficient] = None,
    z: Optional[Tensor] = None,
    s: Optional[Coefficient] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``out = a·x + b·(m + lam·clamp(c·g, −kappa, kappa)) + d·m_prev + s·z``, fused.

    Args:
        x: ``[B, H, D]`` current sample, or None (drops ``a·x``; then ``a`` must be None).
        m: ``[B, H, D]`` model output (ε, x0, v or velocity); required.
        a, b, c, d, s: ``[B]`` per-sample coefficients in the compute dtype (float64 for
            float64 data, float32 otherwise) or Python floats (broadcast to ``[B]``).
            ``a`` is required with ``x``, ``d`` with ``m_prev``, ``s`` with ``z``; ``c``
            defaults to 1 when ``g`` is given.
        g: ``[B, H, D]`` guidance gradient, or None.
        lam: guidance scale λ (finite).
        kappa: clamp bound κ ≥ 0 applied to ``c·g`` element-wise; ``inf`` disables it.
        m_prev: ``[B, H, D]`` previous model output (multistep solvers), or None.
        z: ``[B, H, D]`` fresh noise, or None.
        out: optional ``[B, H, D]`` destination (may be ``x`` or ``m`` for an in-place
            update); not differentiable.

    Returns:
        ``[B, H, D]`` tensor of ``m``'s dtype. All tensors must share shape, dtype,
        device and be contiguous; violations raise ``ValueError``/``TypeError`` naming
        the argument. Differentiable with respect to every tensor argument.
    """
    if not isinstance(m, Tensor):
        raise TypeError(f"guided_step: m must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim < 1:
        raise ValueError("guided_step: m must have a batch dimension ([B, H, D]), got a scalar")
    if g is not None and c is None:
        c = 1.0
    if not (isinstance(b, Tensor) and (a is None or isinstance(a, Tensor))):
        a, b = _coefficient("a", a, m), _coefficient("b", b, m)
    if not (
        (c is None or isinstance(c, Tensor)) and (d is None or isinstance(d, Tensor))
        and (s is None or isinstance(s, Tensor))
    ):  # fmt: skip
        c, d, s = _coefficient("c", c, m), _coefficient("d", d, m), _coefficient("s", s, m)
    args = (x, m, a, b, g, c, m_prev, d, z, s, float(lam), float(kappa))
    if out is not None:
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
            raise RuntimeError("guided_step: out= does not support autograd; call it without out")
        if _plain(out, *args[:10]):
            guided_step_into(out, *args)
        else:
            torch.ops.ate_fast.guided_step_out(out, *args)
        return out
    if _plain(*args[:10]):
        return guided_step_into(torch.empty_like(m), *args)
    return torch.ops.ate_fast.guided_step(*args)
