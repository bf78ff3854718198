"""The inference-time guidance protocol the samplers call every step (ATE_METHOD.md,
"Inference-time steering").

At each model evaluation the sampler computes, for the current sample ``x`` [B, H, D]
and model output ``m`` [B, H, D] (unguided):

1. ``x0_hat`` [B, H, D], the clean-sample estimate implied by ``m``, and ``dx0_dx`` [B],
   its derivative with respect to ``x`` *with the model output held constant* (no
   backpropagation through the policy):

   ======================  ==========================  ================
   model predicts          x0_hat                      dx0_dx
   ======================  ==========================  ================
   epsilon                 (x − √(1−ᾱ)·m) / √ᾱ         1/√ᾱ
   v_prediction            √ᾱ·x − √(1−ᾱ)·m             √ᾱ
   sample                  m                           0 (see below)
   flow velocity (openpi)  x − t·m                     1
   ======================  ==========================  ================

2. ``g = guidance.gradient(x, x0_hat, dx0_dx)`` [B, H, D], the gradient ∇ₓ y of the
   guidance objective (ATE: ``y = −(1/N)‖E(·) − z*‖²``): ``mode="direct"`` evaluates y
   at ``x``; ``mode="tweedie"`` evaluates it at ``x0_hat`` and applies the chain rule
   with the scalar ``dx0_dx``.
3. The guided output ``m + scale·clip(c·g, −clamp, clamp)`` (``c`` from
   :mod:`ate_fast.guidance.coefficients`) replaces ``m`` in the sampler's update, fused
   into the update itself by :func:`ate_fast.guided_step`.

``mode="tweedie"`` with ``prediction_type="sample"`` is rejected: ``x0_hat`` is the
model output itself, so without backpropagating through the policy ``dx0_dx`` is 0
and the guidance would silently do nothing. Use ``mode="direct"`` there.

``mode="policy_vjp"`` (flow samplers only; e.g. :class:`ate_fast.realtime.RTCGuidance`)
backpropagates through the policy. At each model evaluation the sampler runs the model
with autograd on, at a fresh leaf ``x``; ``gradient(x, x0_hat, dx0_dx)`` returns the
*cotangent* ``u = ∇_{x0_hat} y`` [B, H, D] at ``x0_hat``; the sampler pulls it back
through ``x0_hat(x) = p·x + q·m(x)``, the model included (one ``torch.autograd.grad``
per evaluation: ``g = p·u + q·(∂m/∂x)ᵀu``), and uses that ``g`` in step 3.

A guidance of any mode may also define ``coefficient(t)`` (flow samplers only; e.g.
``RTCGuidance``, with or without its Jacobian): ``[K]`` float64 model times (in its
``convention``, one of :data:`~ate_fast.guidance.FLOW_CONVENTIONS`) -> ``[K]`` float64,
the per-step ``c`` that replaces the sampler's (computed once, on the host, so the step
stays a table lookup; a captured loop bakes it in). ``DiffusionSampler`` refuses it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from ate_fast.argument_checks import check_choice, check_float
from ate_fast.errors import ArgumentTypeError
from ate_fast.guidance.coefficients import FLOW_CONVENTIONS

GUIDANCE_MODES = ("direct", "tweedie", "policy_vjp")
# The modes whose gradient needs no backpropagation through the policy (the model runs
# under no_grad and ``dx0_dx`` is a per-sample scalar).
SCALAR_SLOPE_MODES = ("direct", "tweedie")
POLICY_VJP = "policy_vjp"


@runtime_checkable
class Guidance(Protocol):
    """What ``sample(..., guidance=...)`` accepts (e.g. :class:`ate_fast.steer.LatentGuidance`).

    Attributes:
        scale: λ, the weight of the correction (finite float).
        clamp: κ ≥ 0, the element-wise bound on ``c·g`` (``math.inf`` = no clamp).
        mode: ``"direct"``, ``"tweedie"`` or ``"policy_vjp"`` (module docstring).

    ``gradient`` is called once per model evaluation with autograd enabled (the model
    itself runs under ``torch.no_grad()``, except in mode ``"policy_vjp"``). Its inputs
    are sampler-owned buffers that are overwritten after it returns: it must not modify
    them in place or keep references to them. It must return a ``[B, H, D]`` tensor of
    ``x``'s dtype and device. Inside a captured CUDA graph it is replayed, not called: it
    must be capturable (no host synchronisation, no CPU tensors built from data, static
    shapes), and ``scale``/``clamp``/``mode`` are fixed at capture time.

    Mode ``"policy_vjp"`` may add ``convention`` (``"openpi"`` or ``"paper"``) and
    ``coefficient(t [K] float64) -> [K] float64``, the per-step ``c`` (module docstring).

    Any guidance may add ``call_gradient() -> gradient``: a function with ``gradient``'s
    signature and results for the evaluations of one sampler call. The samplers ask for it
    once per call (each ``sample()``, each replay of a captured loop) before the first
    evaluation and call it instead of ``gradient``, except when a step ``callback`` runs
    user code between evaluations; so it may check once per call what nothing but the
    sampler and the model changes within one (:meth:`ate_fast.steer.LatentGuidance.call_gradient`
    checks its encoder and target there).

    Any guidance may add ``reads_x_only`` (``True``): its gradient reads ``x`` alone — not
    ``x0_hat`` nor ``dx0_dx``, which it is then given as None. A sampler may then compute
    it beside the model on a second CUDA stream (``ATE_FAST_GUIDANCE_STREAM=side``,
    :mod:`ate_fast.sampling.guidance_stream`), before the model's output exists.
    :class:`ate_fast.steer.LatentGuidance` declares it in mode ``"direct"``.
    """

    scale: float
    clamp: float
    mode: str

    def gradient(self, x: Tensor, x0_hat: Tensor, dx0_dx: Tensor) -> Tensor:
        """g = ∇ₓ y, [B, H, D]. ``x``, ``x0_hat``: [B, H, D]; ``dx0_dx``: [B].

        direct: y evaluated at ``x``; tweedie: at ``x0_hat``, chain rule with the
        scalar ``dx0_dx`` (no backprop through the policy); policy_vjp: ∇_{x0_hat} y
        only (the sampler applies the chain rule through the policy).
        """
        ...


def check_guidance(guidance: object) -> tuple[float, float, str]:
    """Validate an object against :class:`Guidance`; returns ``(scale, clamp, mode)``.

    Raises TypeError / ValueError naming ``guidance`` and the offending attribute.
    """
    for attr in ("scale", "clamp", "mode", "gradient"):
        if not hasattr(guidance, attr):
            raise ArgumentTypeError(
                f"guidance must follow ate_fast.Guidance (attributes scale, clamp, "
                f"mode and a gradient(x, x0_hat, dx0_dx) method); {type(guidance).__name__} "
                f"has no {attr!r}"
            )
    if not callable(guidance.gradient):
        raise ArgumentTypeError(
            f"guidance.gradient must be callable, got {type(guidance.gradient).__name__}"
        )
    scale, clamp = check_scale_and_clamp(guidance.scale, guidance.clamp, "guidance.")
    mode = check_choice("guidance.mode", guidance.mode, GUIDANCE_MODES)
    per_call = getattr(guidance, "call_gradient", None)
    if per_call is not None and not callable(per_call):
        raise ArgumentTypeError(
            "guidance.call_gradient must be None or callable as call_gradient() -> "
            f"gradient, got {type(per_call).__name__}"
        )
    if hasattr(guidance, "coefficient"):
        if not callable(guidance.coefficient):
            raise ArgumentTypeError(
                "guidance.coefficient must be callable as coefficient(t [K]) -> [K], got "
                f"{type(guidance.coefficient).__name__}"
            )
        check_choice(
            "guidance.convention", getattr(guidance, "convention", None), FLOW_CONVENTIONS,
            " (the time convention of coefficient(t))",
        )  # fmt: skip
    return scale, clamp, mode


def check_scale_and_clamp(scale: object, clamp: object, owner: str = "") -> tuple[float, float]:
    """``(λ, κ)`` as floats: λ finite, κ ≥ 0 (``math.inf``: no clamp); errors name
    ``owner + "scale"`` / ``owner + "clamp"`` (every guidance and Steer check them so)."""
    return (
        check_float(f"{owner}scale", scale),
        check_float(f"{owner}clamp", clamp, 0.0, allow_inf=True, why=" (math.inf: no clamp)"),
    )
