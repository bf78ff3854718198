"""A sampler's whole K-step loop as one traceable ``nn.Module`` (what ``to_onnx`` exports).

The loop is not rewritten here: :class:`SamplerGraph` runs the sampler's own
:meth:`~ate_fast.sampling.Sampler.loop` (the code ``sample()`` and ``capture()`` run)
through the sampler's public export seam, with export stand-ins for what the loop reads:

- the coefficient tables: the sampler's precomputed per-step host arrays
  (``coefficient_tables``, ``model_times``) as float32 buffers, so the schedule's
  coefficients become graph constants;
  coefficient rows are ``[1]`` (broadcast over the batch), model times ``[B]``;
- the fused step: :func:`ate_fast.ops.guided_step_reference`, the op's PyTorch
  definition, instead of ``torch.ops.ate_fast.guided_step_out`` — so no custom op is
  traced, only standard ATen ops (this is the decomposition path, not an onnxscript
  translation of the custom op);
- the guidance gradient: :class:`~ate_fast.export.guidance_graph.MLPGuidanceGraph` or
  ``TransformerGuidanceGraph`` (the encoder's VJP written as forward ops) instead of
  autograd;
- step noise: slices of the ``step_noise`` graph input instead of generator draws;
- real-time chunking (a ``"policy_vjp"`` guidance): the head's own input-VJP
  (``forward_with_vjp``, forward ops) instead of ``torch.autograd.grad``, the cotangent
  from :class:`~ate_fast.export.guidance_graph.RTCGuidanceGraph` with ``prev_chunk`` and
  ``delay`` graph inputs, and the guidance's coefficient tables in place of the sampler's.

Buffers the loop updates in place become functional ops when ``torch.export`` traces it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ate_fast.export.guidance_graph import GuidanceGraph, RTCGuidanceGraph
from ate_fast.export.signature import rebuild_cond
from ate_fast.guidance import POLICY_VJP
from ate_fast.ops.constants import FLOAT32_MAX
from ate_fast.ops.guided_step.ref import guided_step_reference
from ate_fast.sampling import Run, Sampler, StepBuffers
from ate_fast.sampling.inputs import check_output
from ate_fast.sampling.sampler import forward_with_vjp_of
from ate_fast.sampling.workspace import add_time_table


class ModelTraceError(RuntimeError):
    """The sampler's ``model_fn`` could not be traced into the graph."""


TRACEABLE_MODEL = (
    "The whole sampler is exported as one graph, so model_fn(x, t, cond) must be built from "
    "torch operations on its tensor arguments: no .numpy()/.item()/.tolist() or Python "
    "branches on tensor values, no host-side randomness or I/O, no non-torch libraries. "
    "Wrap the network in an nn.Module whose forward(x [B,H,D], t [B], cond) does only that "
    "(ate_fast.models' heads do) and build the sampler with it."
)


def model_trace_message(exc: BaseException) -> str:
    return (
        "model_fn could not be traced into the exported graph "
        f"({type(exc).__name__}: {exc}). {TRACEABLE_MODEL}"
    )


class _Rows:
    """``rows.<name>[k]``: per-step coefficient rows, as :class:`StepTables` gives them
    (with the model times' ``time_blocks`` [K, B] and ``time_rows``, for step features)."""

    def __init__(self) -> None:
        self.time_blocks: dict[str, Tensor] = {}
        self.time_rows: dict[int, tuple[str, int]] = {}


class _ExportLaunch:
    """The sampler's fused step as its torch reference (same arguments as ``Launch``)."""

    def __init__(self, scale: float, clamp: float) -> None:
        self.scale = scale
        # κ = inf is exported as the largest float32: identical for finite values, and no
        # ±inf constant reaches a Clip node.
        self.clamp = FLOAT32_MAX if math.isinf(clamp) else clamp

    def __call__(
        self, out, *, x, m, a, b, g=None, c=None, m_prev=None, d=None, z=None, s=None
    ) -> Tensor:
        if g is None:
            c = None  # unguided: the correction term drops out (as Launch)
        out.copy_(guided_step_reference(x, m, a, b, g, c, m_prev, d, z, s, self.scale, self.clamp))
        return out


class _StepNoise:
    """The sampler's step-noise draws, taken in order from the ``step_noise`` input."""

    def __init__(self, step_noise: Tensor) -> None:
        self.step_noise = step_noise
        self.count = 0

    def __call__(self) -> Tensor:
        if self.count >= self.step_noise.shape[0]:
            raise AssertionError("ate_fast.export: more step-noise draws than planned (bug)")
        z = self.step_noise[self.count]
        self.count += 1
        return z


class _ExportRun(Run):
    """A :class:`Run` whose model call reports untraceable model functions and whose
    guidance gradient is the exported forward-op graph."""

    def __init__(
        self,
        *,
        guide: Optional[GuidanceGraph],
        target: Optional[Tensor],
        prefix: tuple[Tensor, ...] = (),
        **run: Any,
    ):
        super().__init__(**run)
        self.guide = guide
        self.target = target
        self.prefix = prefix  # RTC: (prev_chunk [B, H, D], delay int64 [B])
        self.through_policy = guide is not None and guide.mode == POLICY_VJP
        self.forward_with_vjp = forward_with_vjp_of(self.model_fn) if self.through_policy else None

    def model_vjp(self, x: Tensor, t: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """RTC: ``g = p·u + q·(∂m/∂x)ᵀ u`` with the head's own pullback (forward ops)."""
        if self.forward_with_vjp is None or self.guide is None:
            raise AssertionError("ate_fast.export: a policy_vjp graph without its VJP (bug)")
        try:
            m, pullback = self.model_output_with_vjp(x, t)
        except Exception as exc:
            raise ModelTraceError(model_trace_message(exc)) from exc
        m = check_output("model_fn", m, x)
        p, q = p.view(-1, 1, 1), q.view(-1, 1, 1)
        u = self.guide(p * x + q * m, *self.prefix)
        g = p * u + q * pullback(u)
        return m, check_output("guidance.gradient", g.to(x.dtype), x)

    def model(self, x: Tensor, t: Tensor) -> Tensor:
        try:  # a head's step features, as sample() computes them (once, for every step)
            out = self.model_output(x, t)
        except Exception as exc:
            raise ModelTraceError(model_trace_message(exc)) from exc
        return check_output("model_fn", out, x)

    def gradient(
        self, x: Tensor, m: Tensor, p: Tensor, q: Tensor, dx0_dx: Tensor
    ) -> Optional[Tensor]:
        if self.guide is None:
            return None
        x0_hat = None
        if self.guide.mode == "tweedie":
            x0_hat = self.ws["x0_hat"]
            self.launch(x0_hat, x=x, m=m, a=p, b=q)
        if isinstance(self.guide, RTCGuidanceGraph):  # jacobian=False: the policy held constant
            g = self.guide(x0_hat, *self.prefix) * dx0_dx.view(-1, 1, 1)
        else:
            g = self.guide(x, x0_hat, dx0_dx, self.target)
        return check_output("guidance.gradient", g.to(x.dtype), x)


def model_module(model_fn: Any) -> Optional[nn.Module]:
    """The nn.Module that owns ``model_fn``'s parameters, if it is one or a bound method."""
    if isinstance(model_fn, nn.Module):
        return model_fn
    owner = getattr(model_fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class SamplerGraph(nn.Module):
    """``forward(noise, *cond, [target], [step_noise]) -> actions`` for one sampler setup.

    Args:
        sampler: a :class:`~ate_fast.sampling.FlowSampler` or ``DiffusionSampler``.
        scale, clamp: the guidance's λ and κ (1, inf when unguided).
        guide: the guidance gradient graph, or None (unguided).
        cond_kind, cond_keys: the structure ``cond`` is rebuilt into for ``model_fn``.
        target_input: the graph takes ``target`` [B, d_z] after the cond inputs.
        prefix_inputs: the graph takes ``prev_chunk`` [B, H, D] and ``delay`` int64 [B]
            after the cond inputs (real-time chunking).
        replaced: coefficient tables the guidance replaces (``guidance_coefficients``).
        step_noise_draws: N > 0: the graph takes ``step_noise`` [N, B, H, D] last.
        device: where the coefficient tables live (the example inputs' device).
    """

    def __init__(
        self,
        sampler: Sampler,
        scale: float = 1.0,
        clamp: float = math.inf,
        guide: Optional[GuidanceGraph] = None,
        cond_kind: str = "none",
        cond_keys: Optional[list] = None,
        target_input: bool = False,
        step_noise_draws: int = 0,
        device: Optional[torch.device] = None,
        prefix_inputs: bool = False,
        replaced: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        module = model_module(sampler.model_fn)
        if module is not None:
            self.model = module  # its parameters become the graph's initializers
        self._model_fn = (sampler.model_fn,)  # a tuple: not registered a second time
        self.guide = guide
        self.scale, self.clamp = float(scale), float(clamp)
        self.cond_kind, self.cond_keys = cond_kind, list(cond_keys or [])
        self.num_cond = {"none": 0, "tensor": 1}.get(cond_kind, len(self.cond_keys))
        self.target_input = target_input
        self.prefix_inputs = prefix_inputs
        self.step_noise_draws = step_noise_draws
        tables = {**sampler.coefficient_tables, **(replaced or {})}
        self._coefficients = list(tables)
        self._times = list(sampler.model_times)
        for name, values in tables.items():
            table = torch.tensor(values, dtype=torch.float32, device=device)
            self.register_buffer(f"coef_{name}", table)
        for name, values in sampler.model_times.items():
            dtype = torch.int64 if values.dtype.kind in "iu" else torch.float32
            self.register_buffer(f"time_{name}", torch.tensor(values, dtype=dtype, device=device))

    def _rows(self, batch: Any) -> _Rows:
        rows = _Rows()
        steps = self.sampler.num_steps
        for name in self._coefficients:
            table = getattr(self, f"coef_{name}")
            setattr(rows, name, [table[k : k + 1] for k in range(steps)])
        for name in self._times:
            table = getattr(self, f"time_{name}")
            add_time_table(rows, name, table[:, None].expand(-1, batch).contiguous())
        return rows

    def forward(self, noise: Tensor, *inputs: Tensor) -> Tensor:
        """``noise`` [B, H, D], then the cond tensors, ``target`` [B, d_z] or
        ``prev_chunk`` [B, H, D] and ``delay`` int64 [B], and ``step_noise`` [N, B, H, D]
        as configured. Returns the actions [B, H, D]."""
        cond = rebuild_cond(self.cond_kind, self.cond_keys, list(inputs[: self.num_cond]))
        rest = list(inputs[self.num_cond :])
        target = rest.pop(0) if self.target_input else None
        prefix = (rest.pop(0), rest.pop(0)) if self.prefix_inputs else ()
        draw = _StepNoise(rest.pop(0)) if self.step_noise_draws else None
        ws = StepBuffers(noise)
        run = _ExportRun(
            model_fn=self._model_fn[0], x=ws["x"], cond=cond, tables=self._rows(noise.shape[0]),
            ws=ws, launch=_ExportLaunch(self.scale, self.clamp), draw=draw,
            guide=self.guide, target=target, prefix=prefix,
        )  # fmt: skip
        run.x.copy_(noise)
        self.sampler.loop(run)
        if draw is not None and draw.count != self.step_noise_draws:
            raise AssertionError("ate_fast.export: step-noise draws differ from the plan (bug)")
        return run.x
