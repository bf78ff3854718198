"""The heads' float32 GEMMs on the CPU through oneDNN where MKL takes its AVX2 code.

ATen runs every float32 ``linear`` / ``addmm`` / ``matmul`` on the CPU through MKL's
``sgemm``, and MKL chooses its code by CPU vendor: on a non-Intel CPU it runs AVX2 even
where the CPU has AVX-512 (AMD Zen 4 and 5: EPYC 9004/9005, Ryzen 7000/9000). oneDNN,
which PyTorch ships as well (``torch.backends.mkldnn``), chooses by instruction set. On
one thread of an AMD EPYC (Zen 4), float32, ``x [M, K] @ weightᵀ``: M = 50, 256 → 2048
555 → 282 µs, 4096 → 1024 5.0 → 2.4 ms; M = 4, 5120 → 1024 1.41 → 0.91 ms (on two threads
1.37 → 0.44 ms: MKL does not split a skinny GEMM across threads). oneDNN pays ≈ 12 µs
per call to find its primitive, so below ``MIN_MACS`` multiply-adds (M = 1, 512 → 512:
19 vs 29 µs) ATen's call stays faster. The heads' forwards and hand-written input-VJPs
(FlowTransformerHead, MLPHead — whose layers share one library,
:func:`reaches_onednn_size`; the U-Net's convolutions as chunk rows, :mod:`chunk_conv`)
and the Transformer encoder's guidance VJP (:mod:`ate_fast.steer.transformer_vjp`) call
:func:`linear_of` / :func:`linear` / :func:`times_weight` / :func:`linear_residual_rows`,
which take oneDNN's op (``torch.ops.mkldnn._linear_pointwise``, what Inductor's CPU
lowering calls) exactly when all of these hold, and otherwise ATen's op as before:

* the selected GEMM is ``onednn`` (``$ATE_FAST_CPU_GEMM``: ``auto`` — the default: a
  non-Intel CPU whose ATen kernels run AVX-512 — ``onednn`` or ``aten``);
* CPU float32 tensors (plain ``Tensor`` / ``Parameter``), contiguous, the weight [N, K]
  contiguous or a transposed contiguous [K, N] (a slice of a wider weight takes oneDNN's
  reference path: 69 ms for a [256, 256] half of a [256, 512] weight at M = 50);
* at least ``MIN_MACS`` multiply-adds;
* no autograd record (no operand requires grad while grad mode is on: oneDNN's op has no
  backward), no forward-mode AD level, no ``torch.func`` transform, and no graph capture
  (``torch.compile``, ``torch.export``, the ONNX exporter, ``jit.trace``), whose graphs
  keep ATen's op.

The two compute the same products; only the order of float32 summation differs (tested
against float64). On an Intel CPU ``auto`` keeps MKL, whose AVX-512 code runs there.

**A captured sampler's weights packed once** (:mod:`ate_fast.ops.weight_packs`): inside a
``capture()``'s call, oneDNN reads each parameter from a copy reordered once into its
blocked layout — float32 where oneDNN is selected, and bfloat16 weights of at least
``BF16_MIN_WEIGHT`` elements (which ATen multiplies on oneDNN already) on oneDNN's op too.
The call chooses once per weight and row count: a GEMM that ran on oneDNN is remembered for
the rest of the call (:meth:`~ate_fast.ops.weight_packs.WeightPacks.choose`), and the same
weight's GEMM at the later steps checks only what can change between ops — no compiler or
``jit`` trace, no transform, grad mode off, its operands plain, contiguous, of one dtype
(≈ 2 µs instead of ≈ 8 per GEMM on one core; 21 GEMMs per step of the small flow
transformer). A change of ``$ATE_FAST_CPU_GEMM`` takes effect at the next call.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ate_fast.errors import BackendUnavailableError, InvalidArgumentError
from ate_fast.models.trace_state import opaque_ops_may_run, transforms_active
from ate_fast.module_checks import plain_linear
from ate_fast.ops import weight_packs
from ate_fast.ops.weight_packs import bf16_packing_available, call_weight, packs_weight

ENV_VAR = "ATE_FAST_CPU_GEMM"
CHOICES = ("auto", "onednn", "aten")
# oneDNN from this many multiply-adds (rows x weight elements): on one thread of the Zen 4
# [50, 256] x [256, 128] (1.6 M) 38 -> 28 µs, [16, 640] x [640, 128] (1.3 M) ties,
# [1, 1600] x [1600, 512] (0.8 M) 46 -> 56 µs; on two threads the crossover is ≈ 1 M.
MIN_MACS = 1_500_000
# float32 where oneDNN is selected; bfloat16, which ATen runs on oneDNN's matmul already,
# only inside a captured call whose packs hold the weight (ops.weight_packs)
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
# ... of this many weight elements: on one Zen 4 thread the captured bf16 MLP head's
# [50, 256] x [256, 256] GEMM took 62 µs packed (the lookup's Python included) to ATen's 48
BF16_MIN_WEIGHT = 1 << 18


def selected_gemm() -> str:
    """``onednn`` or ``aten``: what ``$ATE_FAST_CPU_GEMM`` (default ``auto``) selects on this
    machine. Raises where the variable names no choice, or ``onednn`` where it cannot run."""
    return _resolve(os.environ.get(ENV_VAR, ""))


@functools.cache
def _resolve(value: str) -> str:
    choice = value.strip().lower() or "auto"
    if choice not in CHOICES:
        raise InvalidArgumentError(f"{ENV_VAR}: expected one of {list(CHOICES)}, got {value!r}")
    if choice == "aten":
        return "aten"
    ok, why = onednn_linear_available()
    if choice == "onednn" and not ok:
        raise BackendUnavailableError(f"{ENV_VAR}=onednn is unavailable: {why}")
    return "onednn" if ok and (choice == "onednn" or mkl_runs_avx2_on_avx512()) else "aten"


@functools.cache
def onednn_linear_available() -> tuple[bool, str]:
    """``(ok, why not)``: this torch has oneDNN and its linear op computes ``F.linear``
    (with a bias, and a residual added) on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch was built without oneDNN (torch.backends.mkldnn)"
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b, r = (torch.randn(*s, generator=gen) for s in ((3, 8), (4, 8), (4,), (3, 4)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
        ok = ok and torch.allclose(op.binary(x, r, w, b, "add"), r + F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError) as exc:
        return False, f"torch.ops.mkldnn._linear_pointwise failed: {exc}"
    if not ok:
        return False, "torch.ops.mkldnn._linear_pointwise differs from F.linear on a probe"
    return True, ""


@functools.cache
def mkl_runs_avx2_on_avx512() -> bool:
    """A non-Intel CPU (``/proc/cpuinfo``'s vendor) whose ATen kernels run AVX-512: where
    MKL takes its AVX2 code though the CPU has AVX-512 (``auto`` selects oneDNN there)."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return capability.startswith("AVX512") and cpu_vendor() not in ("", "GenuineIntel")


def cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``, …; "" if unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def reaches_onednn_size(rows: int, weight_elements: int) -> bool:
    """Whether ``rows`` rows times a weight of ``weight_elements`` reaches ``MIN_MACS``
    multiply-adds — asked with the smallest weight of a head whose GEMMs should all take
    one library: a step whose small GEMMs run on ATen's MKL and its larger ones on oneDNN
    ran slower than one on MKL alone (the MLP head at 50 rows, one Zen 4 thread: 2.19 →
    1.78 ms captured; benchmarks/README.md, "Where oneDNN starts, timed in whole calls").
    False inside a compiler's or ``jit`` trace (which keep ATen's ops; ``rows`` may be
    symbolic there)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return rows * weight_elements >= MIN_MACS


def onednn_takes(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether ``x`` [..., K] times ``weight`` [N, K] (and ``others``: a bias, a residual)
    runs on oneDNN (the conditions in the module's docs). Cheapest exits first: ≈ 0.3 µs
    for a GEMM under ``MIN_MACS``, ≈ 1 µs on to ATen's op for a larger one."""
    # a trace first: torch.compile must not trace into the choice (it probes oneDNN), and
    # jit.trace would record the size checks
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.dtype not in ONEDNN_DTYPES or x.dim() < 2 or weight.dim() != 2 or not x.is_cpu:
        return False
    if x.shape[-1] != weight.shape[1] or x.numel() // x.shape[-1] * weight.numel() < MIN_MACS:
        return False
    bf16 = x.dtype == torch.bfloat16  # ATen's op is oneDNN's already: only to read a packed copy
    if bf16 and (weight.numel() < BF16_MIN_WEIGHT or weight_packs.active() is None):
        return False
    if bf16 and not bf16_packing_available():
        return False
    if not bf16 and selected_gemm() != "onednn":
        return False
    tensors = [x, weight, *(t for t in others if t is not None)]
    if any(t.dtype != x.dtype for t in tensors):
        return False
    if not all(t.is_contiguous() for t in tensors if t is not weight):
        return False
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        return False
    if not opaque_ops_may_run(*tensors):
        return False
    # bf16: a packed copy whose product is ATen's (made here; its product checked once per
    # kind of copy and rows)
    return not bf16 or packs_weight(weight, x.numel() // x.shape[-1])


_PLAIN = (Tensor, nn.Parameter)


@functools.cache
def _ops() -> tuple:
    """oneDNN's linear op and its residual-add form, as overloads (a packet's call resolves
    the overload again each time); looked up where oneDNN runs, not at import."""
    op = torch.ops.mkldnn._linear_pointwise
    return op.default, op.binary


def _chosen_weight(x: Tensor, weight: Tensor, *others: Optional[Tensor]) -> Optional[Tensor]:
    """Inside a captured call (:func:`~ate_fast.ops.weight_packs.packing`): the packed copy
    of ``weight`` an earlier GEMM of the call ran on oneDNN with rows like ``x``'s, where
    nothing that may change between ops rules it out now; else None (the full choice,
    :func:`onednn_takes`, runs). ``others``: the bias or residual, None where absent."""
    # the compiler first: a graph capture must not read the call's packs
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    packs = weight_packs.active()
    if packs is None or torch.is_grad_enabled() or transforms_active():
        return None
    if type(x) is not Tensor or x.dim() < 2 or not x.is_cpu or not x.is_contiguous():
        return None
    for t in others:
        if t is not None and (type(t) not in _PLAIN or t.dtype != x.dtype or not t.is_contiguous()):
            return None
    width = x.shape[-1]
    if width != weight.shape[-1]:
        return None
    return packs.chosen(weight, x.numel() // width, x.dtype)


def _call_weight_chosen(x: Tensor, weight: Tensor) -> Tensor:
    """:func:`call_weight` for a GEMM oneDNN takes, remembered inside a captured call: the
    rest of the call's GEMMs with this weight skip the choice (:func:`_chosen_weight`)."""
    packed = call_weight(x, weight)
    packs = weight_packs.active()
    if packs is not None:
        packs.choose(weight, x.numel() // x.shape[-1], x.dtype, packed)
    return packed


def _onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _ops()[0](x, _call_weight_chosen(x, weight), bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x`` [..., K], ``weight`` [N, K] -> [..., N]."""
    packed = _chosen_weight(x, weight, bias)
    if packed is not None:
        return _ops()[0](x, packed, bias, "none", [], "")
    if onednn_takes(x, weight, bias):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_of(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)``; a plain ``nn.Linear`` (:func:`~ate_fast.module_checks.plain_linear`) on
    oneDNN where it takes the GEMM."""
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    if not isinstance(weight, Tensor) or not plain_linear(layer):
        return layer(x)
    packed = _chosen_weight(x, weight, bias)
    if packed is not None:
        return _ops()[0](x, packed, bias, "none", [], "")
    if onednn_takes(x, weight, bias):
        return _onednn_linear(x, weight, bias)
    return layer(x)


def times_weight(g: Tensor, weight: Tensor) -> Tensor:
    """``g @ weight`` for ``g`` [..., N] and a Linear's ``weight`` [N, K] -> [..., K] (the
    input-VJP through the layer)."""
    transposed = weight.t()
    packed = _chosen_weight(g, transposed)
    if packed is not None:
        return _ops()[0](g, packed, None, "none", [], "")
    if onednn_takes(g, transposed):
        return _onednn_linear(g, transposed, None)
    return g @ weight


def linear_residual_rows(
    x: Tensor, weight: Tensor, residual: Tensor, in_place: bool = False
) -> Tensor:
    """``residual + x @ weightᵀ`` for ``x`` [..., K], ``weight`` [N, K] and ``residual``
    [..., N] (same leading shape), the residual added to the float32 accumulator before
    the one rounding, as ``addmm`` with the residual as C does.

    ``in_place``: the caller never reads ``residual`` again, so the GEMM may accumulate
    into it and return it. ATen's out-of-place ``addmm`` first copies C into a new output
    (on CUDA a device-to-device memcpy per call: π0's expert, two per block and step, 36
    of a step's 239 kernels on the H200 profile); ``addmm_`` does not. Taken only where an
    in-place write may run (no autograd record, trace or transform) on a contiguous
    ``residual`` that the oneDNN kernel does not take (it writes a new output without a
    copy)."""
    same_shape = residual.shape == x.shape[:-1] + weight.shape[:1]  # no broadcast in oneDNN's add
    packed = _chosen_weight(x, weight, residual) if same_shape else None
    if packed is None and same_shape and onednn_takes(x, weight, residual):
        packed = _call_weight_chosen(x, weight)
    if packed is not None:
        return _ops()[1](x, residual, packed, None, "add")
    rows = x.reshape(-1, x.shape[-1])
    may_write = residual.is_contiguous() and opaque_ops_may_run(x, weight, residual)
    if in_place and same_shape and may_write:
        residual.view(-1, weight.shape[0]).addmm_(rows, weight.t())
        return residual
    return torch.addmm(residual.reshape(-1, weight.shape[0]), rows, weight.t()).view(residual.shape)
