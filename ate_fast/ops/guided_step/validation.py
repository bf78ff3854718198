"""Argument checks of the guided step: metadata only, so they also run on fake tensors
while tracing. :func:`validate` takes one cheap pass for the common, well-formed call
(a per-step call must not pay for messages) and explains the first bad argument
otherwise."""

from __future__ import annotations

import math

from torch import Tensor

from ate_fast.errors import ArgumentTypeError, InvalidArgumentError
from ate_fast.ops.constants import DTYPE_CODES, compute_dtype

DATA_ARGS = ("x", "g", "m_prev", "z")
# each optional data tensor and the [B] coefficient that scales it
_PAIRS = (("x", "a"), ("g", "c"), ("m_prev", "d"), ("z", "s"))


def check_data(name: str, t: Tensor, m: Tensor) -> None:
    """``t`` must be a contiguous tensor with ``m``'s shape, dtype and device."""
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(
            f"guided_step: {name} must be a torch.Tensor or None, got {type(t).__name__}"
        )
    if t.shape != m.shape:
        raise InvalidArgumentError(
            f"guided_step: {name} must have the shape of m {tuple(m.shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != m.dtype:
        raise ArgumentTypeError(f"guided_step: {name} must have m's dtype {m.dtype}, got {t.dtype}")
    if t.device != m.device:
        raise InvalidArgumentError(
            f"guided_step: {name} must be on m's device {m.device}, got {t.device}"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(
            f"guided_step: {name} must be contiguous (the fused kernels read it as one flat "
            f"array), got strides {t.stride()}; call .contiguous() first"
        )


def check_coefficient(name: str, t: Tensor, m: Tensor) -> None:
    """``t`` must be a contiguous ``[B]`` tensor in the compute dtype on ``m``'s device."""
    expected = compute_dtype(m.dtype)
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(
            f"guided_step: {name} must be a torch.Tensor, got {type(t).__name__}"
        )
    if t.shape != (m.shape[0],):
        raise InvalidArgumentError(
            f"guided_step: {name} must have shape [B] = [{m.shape[0]}] (one value per batch "
            f"element), got {tuple(t.shape)}"
        )
    if t.dtype != expected:
        raise ArgumentTypeError(
            f"guided_step: {name} must be {expected} (the compute dtype for {m.dtype} data), "
            f"got {t.dtype}"
        )
    if t.device != m.device:
        raise InvalidArgumentError(
            f"guided_step: {name} must be on m's device {m.device}, got {t.device}"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(
            f"guided_step: {name} must be contiguous, got stride {t.stride()}"
        )


def validate(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp) -> None:
    """Raise a ValueError/TypeError naming the first bad argument."""
    if _well_formed(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
        return
    _explain(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)


def validate_out(out: Tensor, m: Tensor) -> None:
    """``out`` (the destination) must be ``m`` itself or a tensor like it."""
    if out is not m and not (
        out.shape == m.shape and out.dtype == m.dtype and out.device == m.device
        and out.is_contiguous()
    ):  # fmt: skip
        check_data("out", out, m)


def _well_formed(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp) -> bool:
    if not isinstance(m, Tensor):
        return False
    dtype = m.dtype
    if dtype not in DTYPE_CODES or m.ndim < 1 or not m.is_contiguous():
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
        and math.isfinite(scale)
        and clamp >= 0  # False for NaN
    )


def _coefficient_ok(k, cshape, cdtype, device) -> bool:
    return (
        isinstance(k, Tensor) and k.shape == cshape and k.dtype == cdtype
        and k.device == device and k.is_contiguous()
    )  # fmt: skip


def _explain(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp) -> None:
    if not isinstance(m, Tensor):
        raise ArgumentTypeError(f"guided_step: m must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype not in DTYPE_CODES:
        raise ArgumentTypeError(
            f"guided_step: m must be float32, float64, float16 or bfloat16, got {m.dtype}"
        )
    if m.ndim < 1:
        raise InvalidArgumentError(
            "guided_step: m must have a batch dimension ([B, H, D]), got a scalar"
        )
    if not m.is_contiguous():
        raise InvalidArgumentError(
            f"guided_step: m must be contiguous, got strides {m.stride()}; call .contiguous() first"
        )
    given = {"x": x, "a": a, "g": g, "c": c, "m_prev": m_prev, "d": d, "z": z, "s": s}
    for name, coef_name in _PAIRS:
        tensor, coef = given[name], given[coef_name]
        if tensor is None:
            if coef is not None:
                raise InvalidArgumentError(f"guided_step: {coef_name} was given but {name} is None")
            continue
        check_data(name, tensor, m)
        if coef is None:
            raise InvalidArgumentError(
                f"guided_step: {name} was given, so its coefficient {coef_name} is required"
            )
        check_coefficient(coef_name, coef, m)
    check_coefficient("b", b, m)
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"guided_step: scale (λ) must be finite, got {scale}")
    if math.isnan(clamp) or clamp < 0:
        raise InvalidArgumentError(
            f"guided_step: clamp (κ) must be >= 0 (inf disables the clamp), got {clamp}"
        )
    raise InvalidArgumentError(
        "guided_step: inconsistent arguments"
    )  # unreachable if the checks agree
