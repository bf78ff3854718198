"""The flow-transformer block's GEMMs at few rows: torch's (cuBLAS), or a Triton kernel with
narrow column tiles and K split over the SMs (:mod:`ate_fast.models.skinny_gemm_triton`).

At B = 1 a π0 step multiplies 50 rows by each weight: the GEMM is a weight read, and the
question is how many SMs read at once. ``ATE_FAST_SKINNY_GEMM=triton`` runs the block's
four projections (q|kv, o + residual, gate|up, down + residual) on the kernel wherever
they have at most :data:`MAX_ROWS` rows; ``ATE_FAST_SKINNY_GEMM_BLOCK_N`` (16, 32, 64 or
128; default 32) sets its column tile, ``ATE_FAST_SKINNY_GEMM_SPLIT_K`` (``auto``, the
default, or 1 to 64) how many slices of K each tile's product is cut into. Unset, or
``torch``, torch's GEMM runs — the default, as measured: on an H200 (2026-12-04,
``bench_realsize.py``, π0 bf16, B = 1) the kernel *without* the K split took the captured
call to 14.30 / 15.19 / 20.97 ms with 16 / 32 / 64-column tiles against cuBLAS's 13.58 ms
(the GEMMs' time per step 0.64 / 0.72 / 1.30 against 0.49 ms: cuBLAS's ``nvjet`` kernels
split these shapes over the SMs, at 32 % of the copy bandwidth). Wider tiles were slower,
which is the sign of too few programs: o (K = 2048) and down (K = 4096) have 1024 output
columns, 32 programs at 32 columns on 132 SMs, each streaming its strip of the weight
alone. The auto split gives every projection short of one program per SM about two per SM
(o, down: 8 slices; q|kv, 80 tiles: 4); the slices' float partials are summed in order
(deterministic) with the bias and residual — inside a captured graph by each tile's last
program (``ATE_FAST_SPLIT_REDUCE=auto``, the default: counters the capture lends,
:mod:`ate_fast.ops.split_counters`), elsewhere, or with ``kernel``, by a second, small
kernel (the same sums to the bit); gate|up (256 tiles) stays whole. **The split has not run
on a GPU**; ``ATE_FAST_SKINNY_GEMM_SPLIT_K=1`` is the kernel measured above.
It stays an option, a tuner choice and an A/B row (``ate_capture_skinny_gemm_n16``).

Beyond the block: at B = 1 a step's own GEMMs run on the kernel too (action_in, the time
MLP, action_out), the time MLP's first layer with the step's time half as its bias and SiLU
in the epilogue (:attr:`~ate_fast.models.flow_transformer.FlowStepFeatures.time_weight`:
a GEMM, an add and a SiLU in one launch), so that with ``ATE_FAST_TRITON_PDL=on`` every
GEMM of a step is a PDL launch. The Transformer encoder's guidance gradient (its
``triton`` path) runs its projections on the kernel at B = 1, a Linear with its bias and
activation in one launch (:func:`skinny_linear_act`: the activation's input kept for the
backward) and the input-VJP through a weight and the activation before it in one
(:func:`skinny_matmul_act_grad`) — the activation codes and functions of
:mod:`ate_fast.ops.triton_activations`; never run on a GPU.

Like the block's Triton epilogues (:mod:`ate_fast.models.block_epilogues`), the kernel has
no backward and no symbolic form: torch's GEMM runs whenever autograd records, under
tracing or a ``torch.func`` transform, and on tensor subclasses; also for more rows, mixed
dtypes or non-contiguous operands.
"""

from __future__ import annotations

import os
from typing import Optional

from torch import Tensor, nn

from ate_fast.argument_checks import env_choice
from ate_fast.errors import InvalidArgumentError
from ate_fast.models.cpu_gemm import linear, linear_of, times_weight
from ate_fast.models.trace_state import opaque_ops_may_run
from ate_fast.module_checks import plain_linear
from ate_fast.ops import backends
from ate_fast.ops.constants import NO_ACTIVATION, compute_dtype

ENV_VAR = "ATE_FAST_SKINNY_GEMM"
BLOCK_N_VAR = "ATE_FAST_SKINNY_GEMM_BLOCK_N"
SPLIT_K_VAR = "ATE_FAST_SKINNY_GEMM_SPLIT_K"
MAX_SPLIT_K = 64
PATHS = ("torch", "triton")
BLOCK_NS = (16, 32, 64, 128)
DEFAULT_BLOCK_N = 32
ALIGN = 16  # N, K and every pointer: multiples of this (see _aligned)
MAX_ROWS = 64  # one row tile; above it (B = 8: 400 rows) cuBLAS's wide tiles have the SMs


def selected_path() -> str:
    """``$ATE_FAST_SKINNY_GEMM``: ``torch`` (also where unset) or ``triton``."""
    return env_choice(ENV_VAR, PATHS)


def _kernel_selected() -> bool:
    """``$ATE_FAST_SKINNY_GEMM`` is ``triton`` (unset: one dict lookup)."""
    return bool(os.environ.get(ENV_VAR)) and selected_path() == "triton"


def selected(rows: int, *tensors: Tensor) -> bool:
    """Whether the kernel is selected and may take a GEMM of ``rows`` rows on ``tensors``
    (what a call decides once, before its steps: :func:`takes` still checks each GEMM)."""
    return _kernel_selected() and rows <= MAX_ROWS and opaque_ops_may_run(*tensors)


def block_n() -> int:
    """``$ATE_FAST_SKINNY_GEMM_BLOCK_N``, else :data:`DEFAULT_BLOCK_N`."""
    value = os.environ.get(BLOCK_N_VAR, "").strip()
    if not value:
        return DEFAULT_BLOCK_N
    if not value.isdigit() or int(value) not in BLOCK_NS:
        raise InvalidArgumentError(
            f"{BLOCK_N_VAR}: expected one of {list(BLOCK_NS)}, got {value!r}"
        )
    return int(value)


def split_k() -> Optional[int]:
    """``$ATE_FAST_SKINNY_GEMM_SPLIT_K``: K's slices per column tile, 1 to
    :data:`MAX_SPLIT_K`; None (``auto``, also where unset): as many as fill the SMs
    (:func:`ate_fast.models.skinny_gemm_triton.k_splits`)."""
    value = os.environ.get(SPLIT_K_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_SPLIT_K:
        raise InvalidArgumentError(
            f"{SPLIT_K_VAR}: expected auto or an integer from 1 to {MAX_SPLIT_K}, got {value!r}"
        )
    return int(value)


def takes(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether the kernel computes ``x`` [..., K] · ``weight`` [N, K]ᵀ, or · ``weight``
    [K, N] (:func:`skinny_matmul`), with the optional bias / residual ``others``: selected,
    at most :data:`MAX_ROWS` rows, N and K multiples of 16, one dtype, every operand
    contiguous and 16-byte aligned, nothing recording or tracing; raises where it is
    selected and Triton cannot run on the tensors' device."""
    if not _kernel_selected():
        return False
    extra = [t for t in others if t is not None]
    tensors = (x, weight, *extra)
    if (
        not opaque_ops_may_run(*tensors)  # first: a trace's fake tensors have no data_ptr
        or weight.dim() != 2
        or x.numel() > MAX_ROWS * x.shape[-1]
        or not _aligned(*weight.shape, *(t.data_ptr() for t in tensors))
        or any(t.dtype != x.dtype or not t.is_contiguous() for t in tensors)
    ):
        return False
    backends.require_triton(x.device.type, f"{ENV_VAR}=triton")
    return True


def _aligned(*values: int) -> bool:
    """Every value a multiple of 16 (sizes; pointers: 16-byte aligned): what the kernel is
    compiled and checked for (tests/triton_offline_compile.py), its loads vectorised."""
    return all(v % ALIGN == 0 for v in values)


def skinny_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None
) -> Tensor:
    """``x`` [..., K] · ``weight`` [N, K]ᵀ (+ ``bias`` [N]) (+ ``residual`` [..., N]) ->
    [..., N] on the kernel (call where :func:`takes` is true)."""
    return _on_rows(x, weight, bias, residual, weight_kn=False)


def skinny_matmul(x: Tensor, weight: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """``x`` [..., K] · ``weight`` [K, N] (+ ``residual`` [..., N]) -> [..., N] on the kernel
    (call where :func:`takes` is true): a layer's input-VJP through its weight [out, in]
    read as it is stored."""
    return _on_rows(x, weight, None, residual, weight_kn=True)


def skinny_linear_act(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: int
) -> tuple[Tensor, Tensor]:
    """``(pre, act(pre))`` [..., N] with ``pre = x · weight ᵀ (+ bias)`` in the compute dtype
    (:func:`~ate_fast.ops.constants.compute_dtype`: what the backward reads) and
    ``act(pre)`` in ``x``'s, ``activation`` a code of :mod:`ate_fast.ops.triton_activations`
    — a Linear and its activation in one launch (call where :func:`takes` is true)."""
    pre = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=compute_dtype(x.dtype))
    return pre, _on_rows(x, weight, bias, None, weight_kn=False, activation=activation, pre=pre)


def skinny_matmul_act_grad(g: Tensor, weight: Tensor, pre: Tensor, activation: int) -> Tensor:
    """``(g @ weight) ⊙ act'(pre)`` [..., K] for ``g`` [..., N], a Linear's ``weight``
    [N, K] read as stored and ``pre`` [..., K] (contiguous, from :func:`skinny_linear_act`):
    the input-VJP through a layer and the activation before it in one launch (call where
    :func:`takes` is true)."""
    shape = (*g.shape[:-1], weight.shape[1])
    if pre.shape != shape or pre.dtype != compute_dtype(g.dtype) or not pre.is_contiguous():
        raise InvalidArgumentError(
            f"skinny_matmul_act_grad: pre must be a contiguous {compute_dtype(g.dtype)} tensor "
            f"of shape {list(shape)}, got {pre.dtype} {list(pre.shape)}"
        )
    return _on_rows(g, weight, None, None, weight_kn=True, activation=activation, pre=pre,
                    activation_grad=True)  # fmt: skip


def _on_rows(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    weight_kn: bool,
    activation: int = NO_ACTIVATION,
    pre: Optional[Tensor] = None,
    activation_grad: bool = False,
) -> Tensor:
    """The kernel on ``x``'s rows [rows, K] (and ``residual``'s and ``pre``'s), the output
    [..., N] in ``x``'s leading dims."""
    from ate_fast.models.skinny_gemm_triton import skinny_gemm  # imports triton: on use

    rows = x.reshape(-1, x.shape[-1])
    res = None if residual is None else residual.reshape(rows.shape[0], -1)
    saved = None if pre is None else pre.view(rows.shape[0], -1)
    out = skinny_gemm(rows, weight, bias, res, block_n(), split_k(), weight_kn, activation,
                      saved, activation_grad)  # fmt: skip
    return out.view(*x.shape[:-1], out.shape[-1])


def block_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` [..., N]: on the kernel where it :func:`takes`, else
    :func:`~ate_fast.models.cpu_gemm.linear`."""
    if takes(x, weight, bias):
        return skinny_linear(x, weight, bias)
    return linear(x, weight, bias)


def block_times_weight(g: Tensor, weight: Tensor, into: Optional[Tensor] = None) -> Tensor:
    """``(into +) g @ weight`` [..., K] for ``g`` [..., N] and a Linear's ``weight`` [N, K]
    (the input-VJP through the layer): on the kernel, the weight read as stored, where it
    :func:`takes` (:func:`skinny_matmul`), else :func:`~ate_fast.models.cpu_gemm.times_weight`;
    there ``into`` (contiguous, read nowhere else) accumulates in place — an out-of-place
    ``addmm`` would first copy it."""
    if takes(g, weight, into):
        return skinny_matmul(g, weight, into)
    if into is None:
        return times_weight(g, weight)
    n = weight.shape[1]
    return into.view(-1, n).addmm_(g.reshape(-1, g.shape[-1]), weight).view(into.shape)


def block_linear_of(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``: a plain ``nn.Linear`` (:func:`~ate_fast.module_checks.plain_linear`) on
    the kernel where it :func:`takes`, else :func:`~ate_fast.models.cpu_gemm.linear_of`."""
    if plain_linear(layer) and takes(x, layer.weight, layer.bias):
        return skinny_linear(x, layer.weight, layer.bias)
    return linear_of(layer, x)
