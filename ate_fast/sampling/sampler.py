"""What every sampler shares: argument checks, the per-run state, ``sample`` and ``capture``.

A subclass computes its per-step coefficients on the host at construction
(:attr:`Sampler.coefficient_tables`, :attr:`Sampler.model_times`,
:attr:`Sampler.step_noise_draws`) and writes its K-step loop once (:meth:`Sampler.loop`)
in terms of a :class:`Run`: evaluate the model, optionally compute the guidance
gradient, issue fused guided steps into workspace buffers. ``sample()`` runs that loop
eagerly; ``capture()`` replays it (a CUDA graph on GPU); ``ate_fast.export`` traces it
with its own :class:`Run` (these four names are the sampler's export seam).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ate_fast.argument_checks import check_int
from ate_fast.errors import ArgumentTypeError, InvalidArgumentError, LimitExceededError
from ate_fast.guidance import POLICY_VJP, SCALAR_SLOPE_MODES, Guidance, check_guidance
from ate_fast.models.trace_state import sampler_call
from ate_fast.sampling.capture import CapturedSampler
from ate_fast.sampling.finite import (
    DeferredFiniteCheck,
    FiniteCheck,
    finite_check_for,
)
from ate_fast.sampling.guidance_stream import evaluate_beside, side_stream_for
from ate_fast.sampling.inpainting import Inpainting, check_inpainting
from ate_fast.sampling.inputs import check_cond, check_generator, check_noise, check_output
from ate_fast.sampling.launch import CachedLaunch, Launch
from ate_fast.sampling.noise import NoiseDraw
from ate_fast.sampling.step_features import StepFeatureCache, own_head_methods, step_features_of
from ate_fast.sampling.workspace import StepBuffers, StepTables

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
# forward_with_vjp(x, t, cond) -> (out [B, H, D], pullback: u [B, H, D] -> (∂out/∂x)ᵀ u)
ForwardWithVJP = Callable[[Tensor, Tensor, Any], tuple[Tensor, Callable[[Tensor], Tensor]]]
StepCallback = Callable[[int, Tensor], None]
_TABLE_CACHE_SIZE = 8


# The most steps a sampler takes: its per-step tables and buffers are allocated up front,
# and no published diffusion/flow policy samples with more than a few hundred.
MAX_NUM_STEPS = 10_000


def check_num_steps(num_steps: object) -> int:
    """``num_steps`` as an int in ``1..MAX_NUM_STEPS``."""
    num_steps = check_int("num_steps", num_steps, 1)
    if num_steps > MAX_NUM_STEPS:
        raise LimitExceededError(
            f"num_steps must be <= MAX_NUM_STEPS = {MAX_NUM_STEPS} (the per-step tables are "
            f"allocated up front), got {num_steps}"
        )
    return num_steps


def forward_with_vjp_of(model_fn: ModelFn) -> Optional[ForwardWithVJP]:
    """``model_fn``'s own input-VJP, ``forward_with_vjp(x, t, cond) -> (out, pullback)``
    with ``pullback(u [B, H, D]) -> (∂out/∂x)ᵀ u`` [B, H, D], or None (use autograd).

    Found when ``model_fn`` is an ``nn.Module`` (or its bound ``forward``) whose class
    defines ``forward_with_vjp`` next to the ``forward`` that runs — a subclass that
    overrides ``forward`` but not ``forward_with_vjp`` would differentiate another
    function, so it gets autograd — and that has no forward hooks (they would be skipped).
    The reference heads (:mod:`ate_fast.models`: MLPHead, FlowTransformerHead) qualify.
    """
    owner = own_head_methods(model_fn, "forward_with_vjp")
    return None if owner is None else owner.forward_with_vjp


class Run:
    """The state of one pass through a sampler's loop.

    ``x`` [B, H, D] is the sample, updated in place; ``ws`` holds the other buffers;
    ``tables`` the per-step coefficient rows; ``launch`` issues fused guided steps;
    ``inpainting`` (or None) writes known positions into the sample before every model
    evaluation (:meth:`evaluate`) and after every step (:meth:`step_done`).

    A loop gets each model evaluation's output and guidance gradient from
    :meth:`evaluate` (or :meth:`model` then :meth:`gradient`, which is what
    :meth:`evaluate` does unless the guidance's mode is ``"policy_vjp"``).
    """

    def __init__(
        self,
        *,
        model_fn: ModelFn,
        x: Tensor,
        cond: Any,
        tables: StepTables,
        ws: StepBuffers,
        launch: Launch,
        guidance: Optional[Guidance] = None,
        draw: Optional[Callable[[], Tensor]] = None,
        callback: Optional[StepCallback] = None,
        finite: Optional[FiniteCheck] = None,
        inpainting: Optional[Inpainting] = None,
    ) -> None:
        self.model_fn = model_fn
        self.inpainting = inpainting
        self.x = x
        self.cond = cond
        self.tables = tables
        self.ws = ws
        self.launch = launch
        self.guidance = guidance
        self.draw = draw
        self.callback = callback
        self.finite = finite
        self.step = 0  # the step k being computed (step_done(k) moves on to k + 1)
        # policy_vjp guidance differentiates through model_fn (see evaluate()).
        self.through_policy = guidance is not None and guidance.mode == POLICY_VJP
        # the head's own input-VJP when it has one (else autograd): see model_vjp()
        self.forward_with_vjp = forward_with_vjp_of(model_fn) if self.through_policy else None
        # a head with step features gets them computed once per call (see model())
        head = step_features_of(model_fn)
        self.features = (
            None
            if head is None
            else StepFeatureCache(head, tables.time_blocks, tables.time_rows, cond)
        )
        # guidance.gradient until reset() asks for the call's own (see _call_gradient)
        self.guidance_gradient = None if guidance is None else guidance.gradient
        # a guidance that reads x alone may run beside the model (ATE_FAST_GUIDANCE_STREAM)
        self.side_stream = None if self.through_policy else side_stream_for(guidance, x)

    def _call_gradient(self) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
        """This call's ``gradient(x, x0_hat, dx0_dx)``: the guidance's ``call_gradient()``
        when it has one (checks once per call what cannot change within it) and no step
        callback runs user code between evaluations, else ``guidance.gradient``."""
        guidance = self.guidance
        if guidance is None:
            return None
        per_call = getattr(guidance, "call_gradient", None)
        if per_call is None or self.callback is not None:
            return guidance.gradient
        gradient = per_call()
        if not callable(gradient):
            raise ArgumentTypeError(
                "guidance.call_gradient() must return a function gradient(x, x0_hat, dx0_dx), "
                f"got {type(gradient).__name__}"
            )
        return gradient

    def reset(self) -> None:
        """Before each pass through the loop: back to step 0, no features of a past call."""
        self.step = 0
        self.guidance_gradient = self._call_gradient()
        if self.features is not None:
            self.features.reset()
        if self.finite is not None:
            self.finite.reset()

    def model(self, x: Tensor, t: Tensor) -> Tensor:
        """The unguided model output at ``x`` [B, H, D], time ``t`` [B].

        For a head with step features (:mod:`ate_fast.sampling.step_features`) and ``t`` a
        row of the tables, its (t, cond) part comes from this call's features, computed
        for every step at the first evaluation."""
        out = check_output("model_fn", self.model_output(x, t), x)
        if self.finite is not None:
            self.finite.observe(self.step, "model_fn", out)
        return out

    def model_output(self, x: Tensor, t: Tensor) -> Tensor:
        """``model_fn(x, t, cond)`` unchecked, through this call's step features when the
        head has them and ``t`` is a table row."""
        out = None if self.features is None else self.features.forward(x, t)
        return self.model_fn(x, t, self.cond) if out is None else out

    def model_output_with_vjp(self, x: Tensor, t: Tensor) -> tuple[Tensor, Callable]:
        """``forward_with_vjp(x, t, cond)`` unchecked, through the step features likewise."""
        pair = None if self.features is None else self.features.forward_with_vjp(x, t)
        return self.forward_with_vjp(x, t, self.cond) if pair is None else pair

    def gradient(
        self, x: Tensor, m: Tensor, p: Tensor, q: Tensor, dx0_dx: Tensor
    ) -> Optional[Tensor]:
        """The guidance gradient g [B, H, D] at ``x`` (None when unguided).

        ``x0_hat = p·x + q·m`` is the clean-sample estimate; ``dx0_dx`` [B] its slope.
        """
        if self.guidance is None:
            return None
        x0_hat = self.ws["x0_hat"]
        self.launch(x0_hat, x=x, m=m, a=p, b=q)
        with torch.enable_grad():
            g = self.guidance_gradient(x, x0_hat, dx0_dx)
        return self._checked_gradient(g, x)

    def _checked_gradient(self, g: Tensor, x: Tensor) -> Tensor:
        g = check_output("guidance.gradient", g, x)
        if self.finite is not None:
            self.finite.observe(self.step, "guidance.gradient", g)
        return g

    def evaluate(
        self, x: Tensor, t: Tensor, p: Tensor, q: Tensor, dx0_dx: Tensor
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(m, g)`` at ``x`` [B, H, D], time ``t`` [B]: the unguided model output and the
        guidance gradient (None when unguided); ``x0_hat = p·x + q·m``, slope ``dx0_dx``.

        Modes ``"direct"``/``"tweedie"``: :meth:`model` under no_grad, then :meth:`gradient`
        — or, for a guidance that reads ``x`` alone with ``ATE_FAST_GUIDANCE_STREAM=side``
        on CUDA, both at once on two streams (:mod:`ate_fast.sampling.guidance_stream`).
        Mode ``"policy_vjp"``: :meth:`model_vjp` (one VJP through the model). With an
        inpainting, its known positions are written into ``x`` first (in place).
        """
        if self.inpainting is not None:
            self.inpainting.apply_(x)
        if self.through_policy:
            return self.model_vjp(x, t, p, q)
        if self.side_stream is not None:
            m, g = evaluate_beside(
                self.side_stream, x, self.guidance_gradient, lambda: self.model(x, t)
            )
            return m, self._checked_gradient(g, x)
        m = self.model(x, t)
        return m, self.gradient(x, m, p, q, dx0_dx)

    def model_vjp(self, x: Tensor, t: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """``(m, g)`` for a ``"policy_vjp"`` guidance: the guidance returns the cotangent
        ``u = ∇_{x0_hat} y`` [B, H, D] at ``x0_hat = p·x + q·m(x)``, and
        ``g = (∂x0_hat/∂x)ᵀ u = p·u + q·(∂m/∂x)ᵀ u``.

        The VJP through the model is the head's own ``forward_with_vjp`` when it has one
        (:func:`forward_with_vjp_of`: the reference heads of :mod:`ate_fast.models`; forward
        ops only, no autograd tape); otherwise the model runs with autograd at a leaf ``x``
        and one ``torch.autograd.grad`` pulls ``u`` back. Capturable either way: static
        shapes, no host sync (the backward is captured with the forward in a CUDA graph;
        only ``x``'s gradient is computed, never the weights').
        """
        if self.forward_with_vjp is not None:
            m, pullback = self.model_output_with_vjp(x, t)
            m = check_output("model_fn", m, x)
            x0_hat = (p.view(-1, 1, 1) * x + q.view(-1, 1, 1) * m).to(x.dtype)
            u = check_output("guidance.gradient", self.guidance_gradient(x, x0_hat, p), x)
            g = p.view(-1, 1, 1) * u + q.view(-1, 1, 1) * pullback(u)
            return self._observed(m, check_output("guidance.gradient", g.to(x.dtype), x))
        if torch.is_inference_mode_enabled() or x.is_inference():
            raise InvalidArgumentError(
                f"guidance.mode={POLICY_VJP!r} differentiates through model_fn, which "
                "torch.inference_mode() forbids: sample outside inference_mode (no_grad is "
                "fine; the reference heads' own input-VJP needs neither)"
            )
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            m = check_output("model_fn", self.model_fn(leaf, t, self.cond), x)
            x0_hat = (p.view(-1, 1, 1) * leaf + q.view(-1, 1, 1) * m).to(x.dtype)
            u = check_output("guidance.gradient", self.guidance_gradient(x, x0_hat.detach(), p), x)
            (g,) = torch.autograd.grad(x0_hat, leaf, u)
        return self._observed(m.detach(), check_output("guidance.gradient", g, x))

    def _observed(self, m: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        if self.finite is not None:
            self.finite.observe(self.step, "model_fn", m)
            self.finite.observe(self.step, "guidance.gradient", g)
        return m, g

    def noise(self) -> Optional[Tensor]:
        """The next draw of step noise [B, H, D] (None for a deterministic sampler)."""
        return None if self.draw is None else self.draw()

    def step_done(self, k: int) -> None:
        if self.inpainting is not None:
            self.inpainting.apply_(self.x)
        self.step = k + 1
        if self.callback is not None:
            self.callback(k, self.x)


class Sampler:
    """Base class of :class:`DiffusionSampler` and :class:`FlowSampler`.

    Subclasses set, at construction, the export seam's tables —
    :attr:`coefficient_tables` (coefficient name -> ``[K]`` float64 array, the rows the
    loop reads as ``run.tables.<name>[k]``), :attr:`model_times` (name -> ``[K]`` times
    passed to the model) and :attr:`step_noise_draws` (``[K]`` bool: whether step k
    draws noise) — and implement :meth:`loop`.
    """

    coefficient_tables: dict[str, np.ndarray]
    model_times: dict[str, np.ndarray]
    step_noise_draws: np.ndarray
    # whether the loop may be given an inpainting (FlowSampler: clean known positions)
    supports_inpainting = False

    @property
    def stochastic(self) -> bool:
        """Whether the loop draws step noise (DDPM; DDIM with eta > 0)."""
        return bool(np.any(self.step_noise_draws))

    def __init__(self, model_fn: ModelFn, num_steps: int) -> None:
        if not callable(model_fn):
            raise ArgumentTypeError(
                "model_fn must be callable as model_fn(x [B,H,D], t [B], cond) -> [B,H,D], "
                f"got {type(model_fn).__name__}"
            )
        self.model_fn = model_fn
        self.num_steps = check_num_steps(num_steps)
        self._tables: OrderedDict[tuple, StepTables] = OrderedDict()

    # -- subclass hooks ----------------------------------------------------------------
    def loop(self, run: Run) -> None:
        """The K-step loop over ``run`` (``run.x`` [B, H, D] holds the noise on entry and
        the actions on return). Subclasses implement it once; ``sample()``, ``capture()``
        and the ONNX export all run it."""
        raise NotImplementedError

    def _check_guidance_mode(self, guidance: Guidance, mode: str) -> None:
        """Raise if this sampler cannot apply ``guidance`` in ``mode``."""
        if mode == POLICY_VJP:
            raise InvalidArgumentError(
                f"guidance.mode={POLICY_VJP!r} is not supported by {type(self).__name__} "
                f"(FlowSampler applies it); use a guidance with mode in {SCALAR_SLOPE_MODES}"
            )

    def guidance_coefficients(self, guidance: Optional[Guidance]) -> dict[str, np.ndarray]:
        """Coefficient tables (name -> ``[K]`` float64) that ``guidance`` replaces in
        :attr:`coefficient_tables` (a policy_vjp guidance's ``coefficient(t)``); {} here."""
        return {}

    # -- shared machinery --------------------------------------------------------------
    def tables(
        self,
        device: torch.device,
        dtype: torch.dtype,
        batch: int,
        replaced: Optional[dict[str, np.ndarray]] = None,
    ) -> StepTables:
        """The per-step coefficient rows for data of ``dtype`` on ``device`` with batch B;
        ``replaced``: tables that replace the sampler's (:meth:`guidance_coefficients`)."""
        key: tuple = (device, dtype, batch)
        if replaced:
            key += tuple((n, v.tobytes()) for n, v in sorted(replaced.items()))
        tables = self._tables.get(key)
        if tables is None:
            host = {**self.coefficient_tables, **(replaced or {})}
            tables = StepTables(host, self.model_times, device, dtype, batch)
            self._tables[key] = tables
            if len(self._tables) > _TABLE_CACHE_SIZE:
                self._tables.popitem(last=False)
        return tables

    def check_guidance(self, guidance: Optional[Guidance]) -> tuple[float, float]:
        """(λ, κ) for ``guidance`` (1, inf when None); raises for a bad guidance object."""
        if guidance is None:
            return 1.0, math.inf
        scale, clamp, mode = check_guidance(guidance)
        self._check_guidance_mode(guidance, mode)
        return scale, clamp

    def check_inputs(
        self,
        noise: Tensor,
        cond: Any,
        guidance: Optional[Guidance],
        generator: object,
        inpainting: object = None,
    ) -> tuple[float, float]:
        """Validate a call's arguments; returns the guidance's (λ, κ)."""
        check_noise(noise)
        check_cond(cond)
        check_generator(generator, noise.device)
        if inpainting is not None and not self.supports_inpainting:
            raise InvalidArgumentError(
                f"inpainting is not supported by {type(self).__name__} (its samples are "
                "noisy until the last step, so clean known positions cannot be written into "
                "them); use FlowSampler, or inpainting=None"
            )
        check_inpainting(inpainting, noise)
        return self.check_guidance(guidance)

    def execute(self, noise: Tensor, run: Run) -> Tensor:
        """Copy ``noise`` into ``run.x`` and run the loop without autograd; returns ``run.x``."""
        # the export state read once for the K steps' per-op checks (trace_state)
        with torch.no_grad(), sampler_call():
            run.x.copy_(noise)
            run.reset()
            self.loop(run)
        return run.x

    def new_run(
        self,
        ws: StepBuffers,
        cond: Any,
        guidance: Optional[Guidance],
        generator: Optional[torch.Generator],
        launch: Launch,
        callback: Optional[StepCallback] = None,
        finite: Optional[FiniteCheck] = None,
        inpainting: Optional[Inpainting] = None,
    ) -> Run:
        x = ws["x"]
        replaced = self.guidance_coefficients(guidance)
        tables = self.tables(x.device, x.dtype, x.shape[0], replaced)
        draw = NoiseDraw(ws["z"], generator) if self.stochastic else None
        return Run(
            model_fn=self.model_fn, x=x, cond=cond, tables=tables, ws=ws, launch=launch,
            guidance=guidance, draw=draw, callback=callback, finite=finite,
            inpainting=inpainting,
        )  # fmt: skip

    # -- public API --------------------------------------------------------------------
    def sample(
        self,
        noise: Tensor,
        cond: Any = None,
        guidance: Optional[Guidance] = None,
        generator: Optional[torch.Generator] = None,
        *,
        callback: Optional[StepCallback] = None,
        check_finite: bool = True,
        inpainting: Optional[Inpainting] = None,
    ) -> Tensor:
        """Run the K-step loop from ``noise`` [B, H, D]; returns the actions [B, H, D].

        Args:
            noise: the initial sample (pure noise), any float dtype; it is not modified.
            cond: passed to ``model_fn`` unchanged (its tensors are checked for NaN).
            guidance: an object following :class:`Guidance`, or None (unguided).
            generator: the ``torch.Generator`` step noise is drawn from (DDPM, DDIM with
                eta > 0), consumed exactly as diffusers consumes it; None = global RNG.
            callback: ``callback(k, x)`` after step k (0-based) with the current sample
                [B, H, D] (a buffer the next step overwrites: clone it to keep it).
            check_finite: check every model output and guidance gradient for NaN/inf and
                raise :class:`~ate_fast.errors.NonFiniteError` naming the step k and the
                source (``model_fn`` or ``guidance.gradient``); False skips it. On the CPU
                each output is checked as it comes; on an accelerator the checks are
                flags kept on the device and read once after the loop (one host sync per
                call instead of one per step; the error names the first bad step).
            inpainting: None, or an :class:`~ate_fast.sampling.Inpainting` (FlowSampler
                only) whose ``apply_(x)`` writes known positions into the sample before
                every model evaluation and after every step (e.g.
                :class:`ate_fast.realtime.PrefixInpainting`: the committed prefix).

        Raises:
            NonFiniteError: NaN/inf in ``noise``, ``cond`` or (with ``check_finite``) a
                step's model output or guidance gradient.
        """
        scale, clamp = self.check_inputs(noise, cond, guidance, generator, inpainting)
        if callback is not None and not callable(callback):
            raise ArgumentTypeError(
                f"callback must be callable or None, got {type(callback).__name__}"
            )
        ws = StepBuffers(noise)
        finite = finite_check_for(noise.device, self.num_steps) if check_finite else None
        run = self.new_run(
            ws, cond, guidance, generator, CachedLaunch(scale, clamp), callback, finite=finite,
            inpainting=inpainting,
        )  # fmt: skip
        out = self.execute(noise, run)
        if isinstance(finite, DeferredFiniteCheck):
            finite.raise_if_bad()
        return out

    def capture(
        self,
        example_noise: Tensor,
        example_cond: Any = None,
        guidance: Optional[Guidance] = None,
        generator: Optional[torch.Generator] = None,
        *,
        check_finite: bool = True,
        check_finite_steps: bool = False,
        inpainting: Optional[Inpainting] = None,
    ) -> CapturedSampler:
        """A callable replaying the whole K-step loop for inputs shaped like the examples.

        On CUDA the loop is captured once into a CUDA graph; on the CPU its fused steps
        are recorded on the first call and replayed without per-call validation. See
        :class:`ate_fast.sampling.CapturedSampler` for the contract (static shapes, the
        returned buffer is reused, guidance and generator are bound at capture).

        ``check_finite`` checks each call's noise and cond (one sync per call);
        ``check_finite_steps`` (off by default) also flags NaN/inf in every step's model
        output and guidance gradient on the device, inside the captured loop, and reads
        the flags once after each call (one more sync), raising
        :class:`~ate_fast.errors.NonFiniteError` naming the step and the source.
        ``inpainting`` is bound at capture like the guidance (its buffers may change
        between calls: e.g. one capture for every delay of a PrefixInpainting).
        """
        return CapturedSampler(
            self, example_noise, example_cond, guidance, generator,
            check_finite=check_finite, check_finite_steps=check_finite_steps,
            inpainting=inpainting,
        )  # fmt: skip
