"""The flow-transformer block's element-wise epilogues: torch ops, Triton kernels, or (the
gated GELU on the CPU) C++ kernels.

Between its GEMMs a :class:`~ate_fast.models.flow_transformer.FlowTransformerHead` block
runs small element-wise ops — the rotary rotation of queries and keys, the prefix's keys
and values concatenated in front, the gated GELU — and a captured step launches each as a
kernel: at B = 1 each takes a few microseconds of a step whose GEMMs read the weights in
tens, so their count, not their bytes, is what they cost (``benchmarks/README.md``,
"Kernels per flow-transformer block"). Two functions cover them:

* :func:`rotate_qkv` — from the q and kv projections' outputs, the queries
  ``[B, kv_heads, H·heads/kv_heads, hd]`` (each key/value head's query heads folded into
  its rows, token-major) and keys / values ``[B, kv_heads, L + H, hd]`` attention reads
  (torch: 7 kernels with a prefix — the keys rotated into, and the values copied into, the
  call's :class:`PrefixSlot` buffers behind the prefix — 6 without; Triton: 1);
* :func:`gated_gelu` — ``gelu_tanh(gate)·up`` and, for the input-VJP, the GELU
  (torch: 2 kernels; Triton: 1).

With the Triton kernels running, a sampler call with one q|kv GEMM
(``FlowTransformerHead.fuse_qkv``) also folds the block's attention RMSNorm — its weight
goes into ``[W_q; W_kv]`` as the call concatenates them (:func:`fold_norm_weight`), the
GEMM takes the un-normed rows, and :func:`rotate_qkv` (``norm=``) scales each row by its
norm factor ``1/√(mean(x²) + ε)``, computed from the row of x — so no kernel runs that
norm (a launch fewer per block and step); with ``FlowTransformerHead.fold_mlp_norm`` the
MLP norm too, through :func:`norm_gated_gelu` — for free where the norm is weightless
(``FlowTransformerHead.fold_norm_weights_``: ``W_gate_up`` is its own fold), else into a
per-call copy of ``W_gate_up``. The torch ops gain nothing from a fold (CUDA's RMSNorm is
one kernel).

The hand-written input-VJP (:mod:`ate_fast.models.flow_transformer_vjp`, real-time
chunking's pullback) has four more, chosen by the same setting: the gated GELU's backward,
RMSNorm's input-VJP with the residual's gradient added, the softmax recomputed with its
backward, and the rotation undone with the gradients packed into the projections' layout
(torch: 42 kernels per block — 41 element-wise, row and layout ops and the softmax, with one
kv head; Triton: 5; on the CPU's ``native`` path the gated GELU's backward, the RMSNorm
input-VJPs and the rotation's undoing are C++ kernels, the softmax torch ops).

Which path runs: ``ATE_FAST_FLOW_EPILOGUES=torch|triton|native`` forces one (``triton`` raises
:class:`~ate_fast.errors.BackendUnavailableError` where Triton cannot run); unset, the
default of :data:`DEFAULT_PATH` for the tensors' device type where Triton runs there, else
``torch``. On CUDA the default is ``triton``: on an H200 (2026-12-04, bench_realsize.py,
π0 expert bf16, one run) they made the captured call 1.31× (B = 1) and 1.38× (B = 8)
faster and matched ``sample()`` as closely as ``torch.compile`` did. On the CPU it is
``native`` (the Triton kernels run there only through ``TRITON_INTERPRET=1``): the gated
GELU and its backward as C++ kernels (:mod:`ate_fast.models.block_epilogues_cpu`, float32;
≈ 3× ATen's ``gelu`` + product, ≈ 2.5× its backward; the small flow transformer's call
2–5 % faster on one AMD EPYC thread), and :func:`rms_norm` (the block's RMSNorms) and
:func:`rotate_qkv` (the rotation and the values' copy) one C++ kernel each
(with the GELU: the small flow transformer's call 11–13 % faster), the other epilogues
torch ops; every native kernel also takes bfloat16 (computed in float32, each output
rounded once: the small flow transformer's bf16 ``capture()`` 1.15× faster); ``torch``
where the native module is missing (forced, ``native`` raises there and off the CPU). Even then the
torch ops run when autograd records (an input requires grad: training, an autograd VJP),
under ``torch.compile`` / ``torch.export`` tracing (Inductor fuses the torch ops itself; the
ONNX export traces them), under a ``torch.func`` transform or a forward-AD level (``vmap``
over a call's features: the prefix buffers' in-place writes have no batching rule), and on
tensor subclasses — the kernels have no backward, no batching rule and no symbolic form.
The two paths round differently (the kernels compute in float32 and round once per
output), so with the kernels selected a head's output under autograd (torch ops) and
without it (kernels) agree to rounding, not bit for bit.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast import native
from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.models import block_epilogues_cpu
from ate_fast.models.rotary import rotate
from ate_fast.models.trace_state import opaque_ops_may_run
from ate_fast.module_checks import plain_rms_norm
from ate_fast.ops import backends

ENV_VAR = "ATE_FAST_FLOW_EPILOGUES"
PATHS = ("torch", "triton", "native")
MAX_ROW = 16384  # the longest row (width, or keys per softmax row) one Triton program holds


# device type -> the default path where it runs there (the measured winners, see the
# module's docs); device types not listed, or where the path cannot run, use torch ops
DEFAULT_PATH = {"cuda": "triton", "cpu": "native"}


def forced_path() -> Optional[str]:
    """``$ATE_FAST_FLOW_EPILOGUES`` (``torch`` or ``triton``), or None where unset."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in PATHS:
        raise InvalidArgumentError(f"{ENV_VAR}: expected one of {list(PATHS)}, got {value!r}")
    return value


def selected_path(device_type: str = "cpu") -> str:
    """``torch``, ``triton`` or ``native`` on ``device_type``: the forced path, else the
    default for the device type where it runs there (Triton; the native module), else
    ``torch``."""
    forced = forced_path()
    if forced is not None:
        return forced
    default = DEFAULT_PATH.get(device_type, "torch")
    if default == "triton" and not backends.availability("triton", device_type)[0]:
        return "torch"
    if default == "native" and native.load("_C") is None:
        return "torch"
    return default


def writes_in_place(*tensors: Tensor) -> bool:
    """Whether a forward on ``tensors`` may leave the torch ops for in-place writes into a
    call's :class:`PrefixSlot` or for the Triton kernels: not when autograd records (neither
    has a backward), nor under ``torch.compile`` / ``torch.export`` / ``jit`` / ONNX tracing
    (they trace the torch ops: Inductor fuses them, the ONNX export needs them), nor under
    a ``torch.func`` transform or forward-AD level (batched or dual tensors: an ``out=``
    write has no batching or forward-AD rule), nor on tensor subclasses (fake, functional,
    …)."""
    return opaque_ops_may_run(*tensors)


def kernel_path(*tensors: Tensor) -> str:
    """``triton``, ``native`` or ``torch``: which epilogue runs on ``tensors`` — the
    selected path where nothing needs the torch ops (:func:`writes_in_place`), the native
    kernels where every tensor has one dtype they take (float32 or bfloat16,
    ``block_epilogues_cpu.NATIVE_DTYPES``), else the torch ops. Raises where a path is
    forced and cannot run (``triton`` without Triton; ``native`` off the CPU or without the
    native module)."""
    # the trace check first: a graph capture (torch.compile) must not reach the native
    # module's import in selected_path
    if not writes_in_place(*tensors):
        return "torch"
    device_type = tensors[0].device.type
    path = selected_path(device_type)
    if path == "triton":
        # raises only where forced (a default falls back to torch where Triton cannot run)
        backends.require_triton(device_type, f"{ENV_VAR}=triton")
        return path
    if path != "native":
        return "torch"
    if device_type != "cpu":
        raise BackendUnavailableError(
            f"{ENV_VAR}=native: the native kernels run on the CPU, the tensors are on "
            f"{device_type}; unset {ENV_VAR} for the device's default"
        )
    if native.load("_C") is None:
        raise BackendUnavailableError(f"{ENV_VAR}=native: {native.reason('_C')}")
    dtype = tensors[0].dtype
    one_dtype = all(t.dtype == dtype for t in tensors)
    return path if one_dtype and dtype in block_epilogues_cpu.NATIVE_DTYPES else "torch"


def use_triton(*tensors: Tensor) -> bool:
    """Whether the Triton kernels run on ``tensors`` (:func:`kernel_path`)."""
    return kernel_path(*tensors) == "triton"


def use_native(*tensors: Tensor) -> bool:
    """Whether the C++ CPU kernels (:mod:`ate_fast.models.block_epilogues_cpu`) run on
    ``tensors`` (:func:`kernel_path`)."""
    return kernel_path(*tensors) == "native"


def rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` for the block's ``nn.RMSNorm`` over x's last dim: one C++ kernel where
    the native path runs (:func:`kernel_path`; a plain norm, :func:`plain_rms_norm`), else
    the module itself."""
    weight = getattr(norm, "weight", None)
    if plain_rms_norm(norm) and norm.normalized_shape == (x.shape[-1],):
        tensors = (x,) if weight is None else (x, weight)
        if kernel_path(*tensors) == "native":
            return block_epilogues_cpu.rms_norm(x, weight, norm_eps(norm, x.dtype))
    return norm(x)


class PrefixSlot:
    """One block's key/value buffers for one sampler call, ``[B, kv_heads, L + H, hd]`` each:
    the prefix's rows written once, at the first forward that asks, and every step's action
    rows written in place by :func:`rotate_qkv` — instead of concatenating the prefix in
    front at every step (π0's 816-token prefix in bf16: 15 MB per sample per step read and
    written again, at B = 8 a third of the weights' bytes).

    Shared by the steps of one call (``FlowStepFeatures.slots``: one per block), so a step
    overwrites the previous step's action rows. A pullback (the input-VJP, real-time
    chunking) reads the keys and values its forward wrote: it must run before the next
    forward with the same features — as the samplers call it — and :meth:`check` raises if
    it does not (the writes are counted; a stale pullback would silently read another
    step's rows).
    """

    def __init__(self) -> None:
        self._buffers: Optional[tuple[Tensor, Tensor]] = None
        self.writes = 0  # forwards that wrote the action rows so far

    def get(self, prefix: tuple[Tensor, Tensor], horizon: int) -> tuple[Tensor, Tensor]:
        """The ``(keys, values)`` buffers for ``prefix`` [B, kv_heads, L, hd] each and
        ``horizon`` action rows, the prefix written in front; the caller writes its action
        rows (counted in :attr:`writes`)."""
        self.writes += 1
        keys, values = prefix
        buffers = self._buffers
        if buffers is None or buffers[0].shape[2] != keys.shape[2] + horizon:
            batch, kv_heads, length, hd = keys.shape
            shape = (batch, kv_heads, length + horizon, hd)
            buffers = keys.new_empty(shape), values.new_empty(shape)
            buffers[0][:, :, :length].copy_(keys)
            buffers[1][:, :, :length].copy_(values)
            self._buffers = buffers
        return buffers

    def check(self, writes: int) -> None:
        """Raise unless the action rows are still those of the forward that made ``writes``."""
        if self.writes != writes:
            raise InvalidArgumentError(
                "FlowTransformerHead: this pullback reads keys and values that a later forward "
                "with the same step features has overwritten (they share one buffer per "
                "block): call each forward_with_vjp_features' pullback before the next "
                "forward with those features, or take the features again per forward"
            )


def rotate_qkv(
    q_lin: Tensor,
    kv_lin: Tensor,
    cos: Tensor,
    sin: Tensor,
    prefix: Optional[tuple[Tensor, Tensor]],
    heads: int,
    kv_heads: int,
    out: Optional[tuple[Tensor, Tensor]] = None,
    norm: Optional[tuple[Tensor, float]] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention's inputs from the projections: ``q`` [B, kv_heads, H·g, hd] (contiguous;
    g = heads / kv_heads: the query heads sharing a key/value head are folded into its
    rows, ordered (token, query head) — with one kv head that is ``q_lin``'s own layout, so
    attention's output is the o projection's input without a copy) and ``k``, ``v``
    [B, kv_heads, L + H, hd], queries and keys rotated at positions L…L+H−1, the prefix's
    ``(keys, values)`` [B, kv_heads, L, hd] (keys already rotated) in front.

    ``q_lin`` [B, H, heads·hd] and ``kv_lin`` [B, H, 2·kv_heads·hd] (keys' heads first);
    ``cos``, ``sin`` [L + H, hd] (:func:`~ate_fast.models.rotary.rotary_tables`), or per
    sample [B, 1, L + H, hd] (a padded prefix's positions);
    ``prefix`` None when there is none (L = 0). ``out``: a :class:`PrefixSlot`'s buffer pair
    [B, kv_heads, L + H, hd] (contiguous) holding the prefix's rows already: the action
    rows are written into it and it is returned as ``k``, ``v`` (the prefix is not copied).
    ``norm``: ``(x [B, H, width], eps)`` when the projections took the block's input x
    itself, the RMSNorm's weight folded into them (:func:`fold_norm_weight`): each action
    row is scaled by its token's ``1/√(mean(x²) + eps)``, the norm's per-row factor."""
    path = kernel_path(q_lin, kv_lin, cos, sin, *(prefix or ()), *(out or ()))
    if path == "triton":
        import ate_fast.models.block_epilogues_triton as kernels

        if prefix is not None and (prefix[0].stride(-1) != 1 or prefix[1].stride(-1) != 1):
            prefix = (prefix[0].contiguous(), prefix[1].contiguous())
        if norm is not None:
            norm = (norm[0].contiguous(), norm[1])
        return kernels.rotate_qkv(
            kernels.token_rows(q_lin), kernels.token_rows(kv_lin), cos.contiguous(),
            sin.contiguous(), prefix, heads, kv_heads, out, norm,
        )  # fmt: skip
    if norm is not None:
        rstd = inverse_rms(*norm)
        q_lin, kv_lin = (q_lin * rstd).to(q_lin.dtype), (kv_lin * rstd).to(kv_lin.dtype)
    if path == "native":
        q, k, v = block_epilogues_cpu.rotate_qkv(q_lin, kv_lin, cos, sin, heads, kv_heads, out)
        if prefix is not None and out is None:  # as below: the prefix in front
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        return q, k, v
    batch, horizon, _ = q_lin.shape
    group = heads // kv_heads
    # [B, kv_heads, H, g, hd]: a view of q_lin; the rotation's result is contiguous in this
    # order (rotate), so the fold into [B, kv_heads, H·g, hd] is a view too
    q = q_lin.view(batch, horizon, kv_heads, group, -1).transpose(1, 2)
    q = rotate(q, cos[..., -horizon:, None, :], sin[..., -horizon:, None, :])
    q = q.view(batch, kv_heads, horizon * group, -1)
    kv = kv_lin.view(batch, horizon, 2 * kv_heads, q.shape[-1])
    k, v = kv.transpose(1, 2).chunk(2, dim=1)  # [B, kv_heads, H, hd] each
    if out is not None:  # the action rows into the call's buffers, behind the prefix's
        rotate(k, cos[..., -horizon:, :], sin[..., -horizon:, :], out=out[0][:, :, -horizon:])
        out[1][:, :, -horizon:].copy_(v)
        return q, out[0], out[1]
    k = rotate(k, cos[..., -horizon:, :], sin[..., -horizon:, :])
    if prefix is not None:  # the prefix cache: only the action rows are projected
        k = torch.cat([prefix[0], k], dim=2)
        v = torch.cat([prefix[1], v], dim=2)
    return q, k, v


def gated_gelu(gate_up: Tensor, save_act: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(gelu_tanh(gate)·up, gelu_tanh(gate) if save_act else None)`` [.., F] for
    ``gate_up`` [.., 2F] split as ``gate, up`` (Gemma's gated MLP)."""
    path = kernel_path(gate_up)
    if path == "triton":
        import ate_fast.models.block_epilogues_triton as kernels

        return kernels.gated_gelu(gate_up.contiguous(), save_act)
    if path == "native":
        return block_epilogues_cpu.gated_gelu(gate_up, save_act)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh")
    return act * up, act if save_act else None


def norm_gated_gelu(
    gate_up: Tensor, x: Tensor, eps: float, save_act: bool = False
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """:func:`gated_gelu` of ``gate_up`` [.., 2F] = ``x·W'ᵀ``, a projection of the
    un-normed ``x`` [.., width] with the RMSNorm's weight folded into ``W'``
    (:func:`fold_norm_weight`): gate and up are first scaled by their row's
    ``1/√(mean(x²) + eps)``. Returns ``(gelu_tanh(gate)·up, gelu_tanh(gate) or None,
    gate_up as scaled)`` — the last is what the input-VJP reads (the Triton kernel writes it
    back into ``gate_up`` when ``save_act``)."""
    if use_triton(gate_up, x):
        import ate_fast.models.block_epilogues_triton as kernels

        gate_up = gate_up.contiguous()
        out, act = kernels.gated_gelu(gate_up, save_act, (x.contiguous(), eps))
        return out, act, gate_up
    gate_up = (gate_up * inverse_rms(x, eps)).to(gate_up.dtype)
    return (*gated_gelu(gate_up, save_act), gate_up)


def inverse_rms(x: Tensor, eps: float) -> Tensor:
    """RMSNorm's per-row factor ``1/√(mean(x²) + eps)`` [.., 1] of ``x`` [.., width], in
    float32 (float64 for float64 ``x``), as ``torch.nn.RMSNorm`` computes it."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def fold_norm_weight(weight: Tensor, norm: nn.RMSNorm) -> Tensor:
    """``weight`` [N, width] with ``norm``'s weight [width] folded into its columns, so that
    ``x·foldedᵀ·rstd(x)`` is ``linear(norm(x))`` (one rounding of the product in
    ``weight``'s dtype); ``weight`` itself when the norm has no weight."""
    return weight if norm.weight is None else weight * norm.weight.to(weight.dtype)


def norm_eps(norm: nn.RMSNorm, dtype: torch.dtype) -> float:
    """The epsilon ``norm`` adds to mean(x²): its own, or (None) ``dtype``'s machine epsilon,
    as ``torch.nn.functional.rms_norm``."""
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps
