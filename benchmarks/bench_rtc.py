"""Real-time chunking (RTC) latency per policy head: the captured RTC call vs the
unguided captured call, and vs the eager autograd RTC loop a user writes.

Run:  pytest benchmarks/bench_rtc.py -k cpu -p no:cacheprovider --benchmark-json=rtc.json
      python benchmarks/bench_rtc.py rtc.json      (the ratios: min per chunk, median)
      ATE_FAST_RTC_DRY_RUN=1 pytest benchmarks/bench_rtc.py -k cuda --benchmark-disable
          (no GPU: the GPU rows, built and checked on the CPU, π0-expert cut to 2 blocks)

Problem: flow Euler 10 (openpi grid), B = 1, each head at H = 50, D = 32, no conditioning;
``RTCGuidance(Y, d=5, execution_horizon=20)`` (β = 5, "exp" mask). Heads:
``mlp-small`` and ``flow-transformer-small``; ``ATE_FAST_RTC_PI0=1`` adds
``flow-transformer-pi0-expert`` in float32 without conditioning (seconds per call on one
CPU thread). RTC at real size — the π0 expert in bf16 reading its 816-token prefix cache —
is ``bench_realsize.py``'s ``rtc-guided`` rows; this float32 π0 row took the GPU suite's
whole bench_rtc limit on the H200 (2026-12-04) and is no longer run by default.

Rows (``extra_info["impl"]``):

- ``unguided``: ``sampler.capture(noise)`` replayed (the cost RTC adds to).
- ``rtc``: ``sampler.capture(noise, guidance=rtc)`` replayed: the head's own input-VJP
  (``forward_with_vjp``), forward ops only.
- ``rtc_autograd``: the same capture with the head behind a lambda, so the sampler takes
  the VJP by ``torch.autograd.grad`` (what the hand-written VJP saves).
- the epilogues' A/B, flow transformers only, the path other than the default:
  ``rtc_torch_epilogues`` on a GPU (``rtc`` with ``ATE_FAST_FLOW_EPILOGUES=torch``: there
  the block's element-wise ops of the forward and the input-VJP run as Triton kernels by
  default, ``ate_fast.models.block_epilogues``), ``rtc_triton_epilogues`` in the CPU dry
  run (``ATE_FAST_FLOW_EPILOGUES=triton``, only with ``TRITON_INTERPRET=1``).
- ``eager``: the loop a user writes (LeRobot's ``RTCProcessor`` style): per step
  ``x.requires_grad_()``, ``v = model(x, t)``, ``x1 = x − t·v``, ``err = (Y − x1)·W``,
  ``g = autograd.grad(x1, x, err)``, ``v′ = v − min(β, w(t))·g``, Euler step.

Before timing, ``rtc_autograd`` and ``eager`` are checked against ``rtc`` (max error ≤
``ATOL_REL``·max|ref|). CPU: one torch thread; every row runs as ``CHUNKS`` alternating
chunks (unguided, rtc, rtc_autograd, eager, unguided, …) so that all rows sample the same
stretches of a shared machine's load; the figures are, per chunk, the ratio of two rows'
fastest rounds, and their median over the chunks (``python benchmarks/bench_rtc.py``).
GPU: a round is ``GPU_CALLS`` calls and one synchronisation.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import defaultdict
from typing import Callable, Optional
from unittest import mock

import pytest
import torch
from rtc_reference import autograd_rtc_velocity

import ate_fast
from ate_fast.models import block_epilogues, make_head
from ate_fast.realtime import RTCGuidance
from ate_fast.realtime.rtc import rtc_guidance_weight

B, H, D = 1, 50, 32
STEPS = 10
DELAY, EXECUTION_HORIZON, BETA = 5, 20, 5.0
HEADS = {
    "mlp-small": ("mlp", "small"),
    "flow-transformer-small": ("flow-transformer", "small"),
    "flow-transformer-pi0-expert": ("flow-transformer", "pi0-expert"),
}
EPILOGUES_ROW = "rtc_triton_epilogues"  # rtc with ATE_FAST_FLOW_EPILOGUES=triton (dry run)
TORCH_EPILOGUES_ROW = "rtc_torch_epilogues"  # ... =torch (GPU, where triton is the default)
ROWS = ("unguided", "rtc", "rtc_autograd", "eager", EPILOGUES_ROW, TORCH_EPILOGUES_ROW)
# float32: every row but "unguided" computes the same function as "rtc" (the tolerances of
# bench_heads.py, relative to max|ref|: float32 rounding, never timings)
ATOL_REL = {"cpu": 5e-5, "cuda": 2e-4}
CHUNKS = {"cpu": 5, "cuda": 1}
ROUNDS = {"cpu": 10, "cuda": 20}
GPU_CALLS = 10
THREADS = 1
DRY_RUN = os.environ.get("ATE_FAST_RTC_DRY_RUN") == "1"
HAS_GPU = torch.cuda.is_available()


def _cases():
    heads = tuple(HEADS) if os.environ.get("ATE_FAST_RTC_PI0") == "1" else tuple(HEADS)[:2]
    for device in ("cpu", "cuda"):
        if device == "cuda" and not (HAS_GPU or DRY_RUN):
            continue
        for head in heads:
            for chunk in range(CHUNKS[device]):
                for row in ROWS:
                    if row in (EPILOGUES_ROW, TORCH_EPILOGUES_ROW) and row != _epilogues_row(
                        device, head
                    ):
                        continue
                    yield pytest.param(
                        device, head, chunk, row, id=f"{device}-{head}-{chunk}-{row}"
                    )


def _epilogues_row(device: str, head: str) -> Optional[str]:
    """The epilogues' A/B row of the GPU rows of a flow transformer: the torch ops on a GPU
    (the Triton kernels are CUDA's default), the Triton kernels in the dry run on the CPU
    (only through the interpreter, ``TRITON_INTERPRET=1``); None: no such row."""
    if device != "cuda" or not head.startswith("flow-transformer"):
        return None
    if HAS_GPU:
        return TORCH_EPILOGUES_ROW
    return EPILOGUES_ROW if os.environ.get("TRITON_INTERPRET") == "1" else None


def _epilogues(row: str):
    """The environment with the row's ``ATE_FAST_FLOW_EPILOGUES`` while it lasts (a
    context)."""
    path = "torch" if row == TORCH_EPILOGUES_ROW else "triton"
    return mock.patch.dict(os.environ, {block_epilogues.ENV_VAR: path})


def build_head(key: str, device: str) -> torch.nn.Module:
    """The head on ``device`` (the dry run of the GPU rows on the CPU: π0-expert cut to two
    of its 18 blocks, the same structure)."""
    torch.manual_seed(0)
    name, config = HEADS[key]
    overrides = {"depth": 2} if DRY_RUN and not HAS_GPU and key.endswith("pi0-expert") else {}
    return make_head(name, config, horizon=H, action_dim=D, **overrides).to(device).eval()


def eager_rtc_loop(model: Callable, prev: torch.Tensor, weights: torch.Tensor) -> Callable:
    """``loop(noise) -> actions``: the RTC loop written out with autograd (openpi
    convention: t = 1 noise -> 0, x̂₁ = x − t·v, v′ = v − min(β, w(t))·g)."""
    times = [1.0 - k / STEPS for k in range(STEPS)]
    guidance_weight = rtc_guidance_weight(torch.tensor(times).numpy(), BETA).tolist()
    device = prev.device
    t_vecs = [torch.full((B,), t, device=device) for t in times]

    def loop(noise: torch.Tensor) -> torch.Tensor:
        x = noise
        for k, t in enumerate(times):
            w = guidance_weight[k]
            v = autograd_rtc_velocity(model, x, t_vecs[k], t, None, prev, weights, w)
            x = (x + (-1.0 / STEPS) * v).detach()
        return x

    return loop


def rows(
    key: str, device: str, epilogues: Optional[str] = None
) -> dict[str, Callable[[], torch.Tensor]]:
    """Every row's call (no arguments) on the same noise, previous chunk and delay
    (``epilogues``: with that epilogues' A/B row)."""
    head = build_head(key, device)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(B, H, D, generator=gen).to(device)
    prev = torch.randn(B, H, D, generator=gen).to(device)
    rtc = RTCGuidance(prev, DELAY, execution_horizon=EXECUTION_HORIZON, max_guidance_weight=BETA)
    fast = ate_fast.FlowSampler(head, STEPS)
    slow = ate_fast.FlowSampler(lambda x, t, c: head(x, t, c), STEPS)
    with torch.no_grad():
        unguided = fast.capture(noise, check_finite=False)
        captured = fast.capture(noise, guidance=rtc, check_finite=False)
        captured_autograd = slow.capture(noise, guidance=rtc, check_finite=False)
    loop = eager_rtc_loop(head, prev, rtc.weights)
    calls = {
        "unguided": lambda: unguided(noise),
        "rtc": lambda: captured(noise),
        "rtc_autograd": lambda: captured_autograd(noise),
        "eager": lambda: loop(noise),
    }
    if epilogues:  # set while capturing, and per call for the CPU replay
        with _epilogues(epilogues), torch.no_grad():
            captured_other = fast.capture(noise, guidance=rtc, check_finite=False)

        def other_call() -> torch.Tensor:
            with _epilogues(epilogues):
                return captured_other(noise)

        calls[epilogues] = other_call
    return calls


_ROWS_CACHE: dict[tuple[str, str], dict] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("device", "head", "chunk", "row"), list(_cases()))
def test_rtc(benchmark, time_calls, device, head, chunk, row):
    key = (device if HAS_GPU or device == "cpu" else "cpu", head)
    target = key[0]
    if key not in _ROWS_CACHE:
        _ROWS_CACHE.clear()  # one head's captures alive at a time (π0-expert's memory)
        calls = rows(head, target, epilogues=_epilogues_row(device, head))
        with torch.no_grad():
            ref = calls["rtc"]().clone()
            others = ("rtc_autograd", "eager", EPILOGUES_ROW, TORCH_EPILOGUES_ROW)
            for name in [n for n in others if n in calls]:
                err = float((calls[name]() - ref).abs().max() / ref.abs().max())
                assert err <= ATOL_REL[device], f"{head} {name}: relative error {err:.3g}"
            assert float((calls["unguided"]() - ref).abs().max()) > 1e-3  # RTC acts
        _ROWS_CACHE[key] = calls
    fn = _ROWS_CACHE[key][row]
    benchmark.group = f"{device} rtc {head} flow-euler-10 B={B}"
    benchmark.extra_info.update(
        impl=row, device=device, head=head, chunk=chunk, threads=torch.get_num_threads(),
        dry_run=DRY_RUN and not HAS_GPU,
    )  # fmt: skip
    with torch.no_grad():
        for _ in range(2):  # warm-up: allocator, the first (recording) call of a capture
            fn()
        if device == "cuda":
            time_calls(fn, target, GPU_CALLS, rounds=ROUNDS[device])
        else:
            benchmark.pedantic(fn, rounds=ROUNDS[device], iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------------------ ratios
RATIOS = (
    ("rtc", "unguided"), ("eager", "rtc"), ("rtc_autograd", "rtc"), ("rtc", EPILOGUES_ROW),
    (TORCH_EPILOGUES_ROW, "rtc"),
)  # fmt: skip


def ratios(bench: dict) -> dict[str, dict[str, float]]:
    """group -> ``"a/b"`` -> the median over chunks of (a's fastest round / b's), for the
    pairs in :data:`RATIOS` (rtc/unguided: RTC's cost; eager/rtc and rtc_autograd/rtc:
    how much faster the captured RTC call is; rtc/rtc_triton_epilogues (dry run) and
    rtc_torch_epilogues/rtc (GPU): what the Triton epilogues gain)."""
    chunks: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for entry in bench.get("benchmarks", []):
        extra = entry.get("extra_info", {})
        per_call = entry["stats"]["min"] / extra.get("calls", 1)
        chunks[entry["group"]][extra.get("chunk", 0)][extra["impl"]] = per_call
    out: dict[str, dict[str, float]] = {}
    for group, per_chunk in chunks.items():
        figures = {}
        for a, b in RATIOS:
            values = [c[a] / c[b] for c in per_chunk.values() if a in c and b in c]
            if values:
                figures[f"{a}/{b}"] = statistics.median(values)
        fastest = {
            impl: min(c[impl] for c in per_chunk.values() if impl in c)
            for impl in ROWS if any(impl in c for c in per_chunk.values())
        }  # fmt: skip
        figures.update({f"{impl} ms": 1e3 * s for impl, s in fastest.items()})
        out[group] = figures
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for path in args:
        for group, figures in ratios(json.loads(open(path).read())).items():
            shown = ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
            print(f"{group}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
