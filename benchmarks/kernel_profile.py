"""Kernels per call and their summed time: a torch.profiler pass over a few calls of a
function (shared by ``profile_capture.py`` and ``bench_realsize.py``).

On CUDA it counts device kernels (those inside a replayed CUDA graph too) and sums their
device time, so ``wall − device`` is the time the GPU sat between kernels: a call whose
kernels are many and short is bound by their count, not by its FLOPs or bytes. On the CPU
it counts ATen ops and sums their self CPU time (a proxy only: a composite op and the ops
it calls are all counted, e.g. ``linear`` and its ``addmm``, so the count overstates the
kernels a GPU would launch). Profiled times are somewhat inflated;
the benchmarks' timings are the reference for latency.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def _device_time_us(event: Any) -> float:
    """Self device time of a profiler aggregate (its name moved across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


# What a kernel is, from its name: cuBLAS / CUTLASS / nvjet GEMMs, flash / fused attention,
# Triton kernels (ours and Inductor's), the rest (copies, elementwise, reductions). First
# match wins; the order matters where a name says two (a Triton matmul is a GEMM).
KINDS = (
    (
        "gemm",
        re.compile(r"gemm|gemv|nvjet|xmma|cutlass|matmul|_mm_|splitk|^aten::(b|add)?mm$", re.I),
    ),
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|softmax", re.I)),
    ("triton", re.compile(r"^triton_|_kernel$", re.I)),
)


def kernel_kind(name: str) -> str:
    """``"gemm"``, ``"attention"``, ``"triton"`` or ``"other"``, from a kernel's name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def kernel_profile(fn: Callable[[], Any], device: str, calls: int, top: int = 10) -> dict:
    """Profile ``calls`` calls of ``fn()`` on ``device`` ("cuda" or "cpu"; warm it up
    first). Returns ``{"kernels_per_call", "kernels_us_per_call", "top"}`` on CUDA,
    ``{"aten_ops_per_call", "aten_ops_us_per_call", "top"}`` on the CPU; ``top``: the
    ``top`` costliest kernels / ops with their count and µs per call; ``by_kind``: µs per
    call of each :func:`kernel_kind` (on the CPU, of the ATen ops' names)."""
    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if _device_time_us(e) > 0 and e.device_type.name == "CUDA"]
        cost, label = _device_time_us, "kernels"
    else:
        kernels = [e for e in events if e.key.startswith("aten::")]

        def cost(e: Any) -> float:
            return float(e.self_cpu_time_total)

        label = "aten_ops"
    ranked = sorted(kernels, key=cost, reverse=True)[:top]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + cost(e) / calls
    return {
        f"{label}_per_call": sum(e.count for e in kernels) / calls,
        f"{label}_us_per_call": sum(cost(e) for e in kernels) / calls,
        "top": [
            {"name": e.key, "count_per_call": e.count / calls, "us_per_call": cost(e) / calls}
            for e in ranked
        ],
        "by_kind": by_kind,
    }
