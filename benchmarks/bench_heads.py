"""Whole-sampler latency per policy head: the loop a user writes (eager, torch.compile, a
hand-captured CUDA graph) vs ate_fast's ``sample()`` and ``capture()``.

Run:  pytest benchmarks/bench_heads.py -k cuda --benchmark-json=bench_heads.json
      python benchmarks/report.py bench_heads.json       (gpu_summary.py: the targets)
      pytest benchmarks/bench_heads.py -k cpu -q --benchmark-disable   (the CPU check)
      python benchmarks/bench_heads.py                   (the plan: cases, compiles, time)

One benchmark group per (device, head, sampler, guidance) at B = 1, each head at the
(H, D) of its config; conditioning only where the head needs it (the U-Nets: a fixed random
[B, cond_dim] observation feature, ``_cond``; ``cond=None`` for the flow heads):

- heads: ``flow-transformer-small`` (H=50, D=32), ``mlp-small`` (50, 32), ``unet1d-small``
  (16, 2), ``flow-transformer-pi0-expert`` (50, 32), ``unet1d-dp`` (16, 2);
- samplers: ``flow-euler-10`` (openpi grid), ``ddim-10`` and ``dpmsolver++-5`` (2M,
  diffusers' defaults) on ``NoiseSchedule()`` (linear, 1000 steps), ε-prediction;
- guidance: ``unguided``; ``mlp-guided``: ATE latent guidance (λ = 2, κ = 0.1, direct)
  through an ``ActionVAE(arch="mlp")`` encoder (H·D → 256 → 256 → 2·64);
  ``transformer-guided``: through the paper's ``ActionVAE(arch="transformer")`` encoder
  (d_model 512, 4 heads, 9 layers, d_z 512), small heads only (compile time).

Rows (``extra_info["impl"]``), all computing the same function from the same noise:

- ``eager``: the plain PyTorch loop a user writes under ``torch.no_grad()``: the head
  call, then the update written out in tensor ops with host-side Python coefficients;
  guided: ``g`` by ``torch.autograd.grad`` through the encoder and
  ``m + λ·clamp(c·g, −κ, κ)`` written out.
- ``compile``: the same loop with the head, and the guidance gradient (``torch.func.grad``
  of the same objective), each ``torch.compile(mode="reduce-overhead")`` once per module
  and reused by every case; ``torch.compiler.cudagraph_mark_step_begin()`` before each
  step; warmed up (compiled, CUDA-graph-recorded) before the check and the timing.
- ``cuda_graph`` (CUDA only): the eager loop, autograd included, captured by hand into a
  ``torch.cuda.CUDAGraph`` (side-stream warm-up, static noise/output), replayed.
- ``ate_sample``: ``sampler.sample(noise, guidance=LatentGuidance(vae, z*))``.
- ``ate_capture``: ``sampler.capture(noise, guidance=..., check_finite=False)`` replayed
  (CUDA: one CUDA graph; CPU: recorded fused steps).
- ``ate_capture_compiled`` (CUDA, flow transformer small): the same capture of
  ``torch.compile(head)`` (default mode: Inductor's fused kernels, no CUDA graphs of its
  own — the sampler's one graph replays them) with the transformer encoder's guidance on
  the ``compiled`` path: what a user gets from ate_fast plus Inductor.
- ``ate_capture_triton`` (CUDA, flow transformer small, transformer-guided only): the
  ``ate_capture`` row with the transformer encoder's guidance on the opt-in ``triton``
  path (``ATE_FAST_TRANSFORMER_GUIDANCE=triton``: ``ate_fast.steer.transformer_triton``'s
  fused LayerNorm / activation / attention kernels); compare with ``ate_capture`` (the
  default ``vjp`` path). Added without a GPU: these kernels have never run on one.

The head gets float32 times on every row: flow t ∈ (0, 1] for the flow heads (MLP,
flow transformer), integer training timesteps for the U-Nets; a sampler of the other kind
is adapted by a factor (flow heads in DDIM: t·10⁻³; U-Nets in a flow loop: t·10³), the
same op on every row, so one compiled graph per head serves all samplers. Such a wrapped
head is an opaque function to the samplers, so only the native (head, sampler) pairs get
the heads' step features (their time and conditioning path once per call:
docs/architecture.md); a user who wants them sets the head's ``time_scale`` instead.

Before timing, every row's output is checked against ``ate_sample``'s for the same noise
(max error ≤ ``ATOL_REL``·max|ref|: float32 rounding, never timings). A round is one
call and one synchronisation (the latency a control loop sees). Rounds are capped so a
row takes ≈ ``ROW_SECONDS``. ``ATE_FAST_HEADS_BUDGET_S`` (seconds from import) skips the
cases left once it is spent, so a time-limited run still writes its JSON.
``ATE_FAST_HEADS_CPU=full`` runs every case on the CPU too (checks the loops without a
GPU; slow); the default CPU subset is the MLP head, flow Euler 10, unguided and
MLP-guided.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from ate_fast.models import make_head
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule

B = 1
HAS_GPU = torch.cuda.is_available()
# id -> (registry name, config)
HEADS = {
    "flow-transformer-small": ("flow-transformer", "small"),
    "mlp-small": ("mlp", "small"),
    "unet1d-small": ("unet1d", "small"),
    "flow-transformer-pi0-expert": ("flow-transformer", "pi0-expert"),
    "unet1d-dp": ("unet1d", "dp"),
}
SMALL_HEADS = ("flow-transformer-small", "mlp-small", "unet1d-small")
SAMPLERS = ("flow-euler-10", "ddim-10", "dpmsolver++-5")
GUIDANCES = ("unguided", "mlp-guided", "transformer-guided")
CUDA_ROWS = (
    "eager", "ate_sample", "ate_capture", "cuda_graph", "compile", "ate_capture_compiled",
    "ate_capture_triton",
)  # fmt: skip
COMPILED_CAPTURE_HEADS = ("flow-transformer-small",)  # the targets' head (compile time)
TRITON_CAPTURE_HEADS = ("flow-transformer-small",)  # transformer-guided only
CPU_ROWS = ("eager", "ate_sample", "ate_capture", "compile")
LAMBDA, KAPPA = 2.0, 0.1
FLOOR = 1e-6  # the flow guidance coefficient's denominator floor (ate_fast.steer)
# Check tolerance, relative to max|ref|. Measured on the CPU (every case but π0-expert,
# every row but cuda_graph): ≤ 3e-6; guided vs unguided differ by ≥ 1e-3 of max|ref|
# (DDIM/DPM-Solver++ outputs reach ~700 with these untrained ε-heads), so a lost guidance
# term still fails.
ATOL_REL = {"cpu": 5e-5, "cuda": 2e-4}
ROW_SECONDS = {"cpu": 0.5, "cuda": 0.15}
MAX_ROUNDS = {"cpu": 20, "cuda": 40}
# Rough cold-cache torch.compile seconds per compiled unit on the GPU host (a guess for
# the plan, not a measurement): head graphs and guidance-gradient graphs.
COMPILE_GUESS_S = {"head": 20.0, "pi0-expert": 40.0, "mlp-grad": 8.0, "transformer-grad": 30.0}
# Rough seconds per benchmark besides compiling: check, warm-up, capture, timed rounds.
CASE_GUESS_S = {"cpu": 2.0, "cuda": 0.3}
BUDGET_S = float(os.environ.get("ATE_FAST_HEADS_BUDGET_S", "inf"))
_STARTED = time.monotonic()


def _priority(head: str, guidance: str) -> int:
    """Run order, so that a budget cut drops the least needed cases: the flow transformer
    (the issue's targets) first, then the other small heads, the large heads, and last the
    transformer-encoder guidance of the other small heads."""
    if head == "flow-transformer-small":
        return 0
    if guidance == "transformer-guided":
        return 3
    return 1 if head in SMALL_HEADS else 2


def _cases(device: str, full: bool = True) -> list[tuple[str, str, str, str, str]]:
    rows = CUDA_ROWS if device == "cuda" else CPU_ROWS
    if not full:
        heads, samplers, guidances = ("mlp-small",), ("flow-euler-10",), GUIDANCES[:2]
    else:
        heads, samplers, guidances = tuple(HEADS), SAMPLERS, GUIDANCES
    problems = [
        (head, sampler, guidance)
        for head in heads
        for sampler in samplers
        for guidance in guidances
        if guidance != "transformer-guided" or head in SMALL_HEADS
    ]
    problems.sort(key=lambda p: _priority(p[0], p[2]))
    return [
        (device, *problem, row)
        for problem in problems
        for row in rows
        if row != "ate_capture_compiled" or problem[0] in COMPILED_CAPTURE_HEADS
        if row != "ate_capture_triton"
        or (problem[0] in TRITON_CAPTURE_HEADS and problem[2] == "transformer-guided")
    ]


CASES = _cases("cpu", full=os.environ.get("ATE_FAST_HEADS_CPU") == "full")
if HAS_GPU:
    CASES += _cases("cuda")


def _compile_units(cases) -> list[tuple]:
    """The distinct torch.compile'd callables the ``compile`` and ``ate_capture_compiled``
    rows of ``cases`` build."""
    units: list[tuple] = []
    for device, head, _, guidance, row in cases:
        if row == "compile":
            keys = [(device, "head", head)]
            if guidance != "unguided":
                keys.append((device, guidance.replace("-guided", "-grad"), _shape(head)))
        elif row == "ate_capture_compiled":
            keys = [(device, "head", head, "default")]
            if guidance == "transformer-guided":
                keys.append((device, "transformer-grad", _shape(head), "vjp"))
        else:
            continue
        units += [k for k in keys if k not in units]
    return units


def _compile_guess(unit: tuple) -> float:
    if unit[1] == "head":
        return COMPILE_GUESS_S["pi0-expert" if "pi0-expert" in unit[2] else "head"]
    return COMPILE_GUESS_S[unit[1]]


def plan(cases=None) -> str:
    """The cases, the torch.compile count and a rough time estimate, as text."""
    cases = _cases("cuda") if cases is None else cases
    units = _compile_units(cases)
    heads = sum(u[1] == "head" for u in units)
    compiling = sum(_compile_guess(u) for u in units)
    timing = sum(CASE_GUESS_S[c[0]] for c in cases)
    groups = len({c[:4] for c in cases})
    return (
        f"bench_heads plan: {len(cases)} benchmarks in {groups} groups; {len(units)} "
        f"torch.compile units ({heads} heads, {len(units) - heads} guidance gradients); "
        f"estimate ≈ {compiling:.0f} s compiling + ≈ {timing:.0f} s checking and timing "
        "(rough guesses, cold compile cache)"
    )


# -- problem set-up (cached per module: one head, encoder and compiled graph each) ------------
_CACHE: dict = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _shape(head_id: str) -> tuple[int, int]:
    with torch.device("meta"):
        cfg = make_head(*HEADS[head_id]).config
    return cfg.horizon, cfg.action_dim


def _head(device: str, head_id: str) -> torch.nn.Module:
    def build():
        torch.manual_seed(0)
        with torch.device(device):
            head = make_head(*HEADS[head_id])
        return head.eval().requires_grad_(False)

    return _cached((device, "head", head_id), build)


def _cond(device: str, head_id: str) -> Optional[torch.Tensor]:
    """The head's conditioning on every row: [B, cond_dim] for a head built with one."""
    cond_dim = getattr(_head(device, head_id).config, "cond_dim", 0)
    if not cond_dim:
        return None
    gen = torch.Generator().manual_seed(4)
    return _cached(
        (device, "cond", head_id), lambda: torch.randn(B, cond_dim, generator=gen).to(device)
    )


def _time_factor(head_id: str, sampler: str) -> float:
    """What the sampler's time is multiplied by before the head sees it (1: native)."""
    flow_head = HEADS[head_id][0] != "unet1d"
    flow_sampler = sampler.startswith("flow")
    if flow_head == flow_sampler:
        return 1.0
    return 1e-3 if flow_head else 1e3


def _schedule() -> NoiseSchedule:
    return _cached("schedule", NoiseSchedule)


def _ate_sampler(head_id: str, sampler: str, model_fn):
    if sampler == "flow-euler-10":
        return FlowSampler(model_fn, 10)
    if sampler == "ddim-10":
        return DiffusionSampler(model_fn, _schedule(), "ddim", 10)
    return DiffusionSampler(model_fn, _schedule(), "dpmsolver++", 5)


def _ate_model_fn(head: torch.nn.Module, factor: float):
    if factor == 1.0:
        return head  # the heads cast t to float32 themselves

    def model_fn(x, t, cond):
        return head(x, t.to(torch.float32) * factor, cond)

    return model_fn


class _Encoder:
    """One ActionVAE encoder, its target z*, the ate_fast guidance and the user's gradient.
    ``kind``: ``"mlp"`` (H·D → 256 → 256 → 2·64), ``"mlp-default"`` (→ 512 → 512 → 2·64,
    the CI gate's) or ``"transformer"`` (the paper's)."""

    def __init__(self, device: str, kind: str, horizon: int, action_dim: int) -> None:
        from ate_fast.align import ActionVAE
        from ate_fast.steer import LatentGuidance

        torch.manual_seed(2)
        if kind == "mlp":
            vae = ActionVAE(action_dim, horizon, latent_dim=64, arch="mlp", hidden_dims=(256, 256))
        elif kind == "mlp-default":  # the align default's widths: H·D → 512 → 512 → 2·64
            vae = ActionVAE(action_dim, horizon, latent_dim=64, arch="mlp")
        else:  # the paper's encoder: d_model 512, 4 heads, ff 1024, 9 layers, d_z 512
            vae = ActionVAE(action_dim, horizon, latent_dim=512, arch="transformer")
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.target = torch.randn(vae.latent_dim, generator=torch.Generator().manual_seed(3))
        self.target = self.target.to(device)
        self.guidance = LatentGuidance(self.vae, self.target, scale=LAMBDA, clamp=KAPPA)
        self._compiled: Optional[Callable] = None

    def objective(self, u: torch.Tensor) -> torch.Tensor:
        """y = −Σ_b mean_j (μ(u)_bj − z*_j)²: ATE's per-sample objective, summed."""
        mu, _ = self.vae.encoder(u)
        return -(mu - self.target).square().mean(dim=1).sum()

    def autograd_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """What a user writes: ∇ₓy by autograd (called inside ``torch.no_grad()``)."""
        with torch.enable_grad():
            u = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.objective(u), u)
        return g

    def compiled_gradient(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``torch.func.grad`` of the objective, compiled once per encoder."""
        if self._compiled is None:
            self._compiled = torch.compile(torch.func.grad(self.objective), mode="reduce-overhead")
        return self._compiled


def _encoder(device: str, kind: str, head_id: str) -> _Encoder:
    horizon, action_dim = _shape(head_id)
    return _cached(
        (device, "encoder", kind, horizon, action_dim),
        lambda: _Encoder(device, kind, horizon, action_dim),
    )


def _compiled_head(device: str, head_id: str, mode: str = "reduce-overhead"):
    return _cached(
        (device, "compiled-head", head_id, mode),
        lambda: torch.compile(_head(device, head_id), mode=mode),
    )


# -- the user's loops ------------------------------------------------------------------------
def _user_loop(
    model,
    sampler: str,
    factor: float,
    gradient: Optional[Callable],
    device: str,
    mark_step: bool = False,
    cond: Optional[torch.Tensor] = None,
):
    """The loop a user writes: precomputed float32 head times, Python-float coefficients,
    the update in tensor ops. ``gradient(x)`` -> g (None: unguided); ``cond`` goes to
    every head call."""

    def times(values) -> list[torch.Tensor]:
        out = []
        for v in values:
            t = torch.full((B,), float(v), dtype=torch.float32, device=device)
            out.append(t if factor == 1.0 else t * factor)
        return out

    def corrected(m, x, c):
        if gradient is None:
            return m
        g = gradient(x)
        return m + LAMBDA * torch.clamp(c * g, -KAPPA, KAPPA)

    def begin_step():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()

    if sampler == "flow-euler-10":
        k = 10
        t_values = [1.0 - i / k for i in range(k)]
        tt = times(t_values)
        cs = [-t / max(1.0 - t, FLOOR) for t in t_values]
        dt = -1.0 / k

        def run(noise):
            with torch.no_grad():
                x = noise.clone()
                for i in range(k):
                    begin_step()
                    v = corrected(model(x, tt[i], cond), x, cs[i])
                    x = x + dt * v
                return x

        return run

    ac = _schedule().alphas_cumprod.numpy()
    if sampler == "ddim-10":
        k, n = 10, len(ac)
        steps = list(range(0, n, n // k))[::-1]  # "leading": 900, 800, …, 0
        tt = times(steps)
        sa = [math.sqrt(ac[t]) for t in steps]
        s1 = [math.sqrt(1.0 - ac[t]) for t in steps]
        prev = [ac[t - n // k] if t - n // k >= 0 else 1.0 for t in steps]
        sap = [math.sqrt(a) for a in prev]
        s1p = [math.sqrt(1.0 - a) for a in prev]

        def run(noise):
            with torch.no_grad():
                x = noise.clone()
                for i in range(k):
                    begin_step()
                    eps = corrected(model(x, tt[i], cond), x, -s1[i])
                    x0 = (x - s1[i] * eps) / sa[i]
                    x = sap[i] * x0 + s1p[i] * eps
                return x

        return run

    # DPM-Solver++ 2M (midpoint), diffusers' defaults: "linspace" timesteps, first and
    # last step first order, the last one landing on σ = 0 (x = x̂0).
    k, n = 5, len(ac)
    steps = np.linspace(0, n - 1, k + 1).round()[::-1][:-1].astype(np.int64).tolist()
    tt = times(steps)
    alpha = [math.sqrt(ac[t]) for t in steps]
    sigma = [math.sqrt(1.0 - ac[t]) for t in steps]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma)]

    def run(noise):
        with torch.no_grad():
            x, x0_prev = noise.clone(), None
            for i in range(k):
                begin_step()
                m = corrected(model(x, tt[i], cond), x, -sigma[i])
                x0 = (x - sigma[i] * m) / alpha[i]
                if i == k - 1:
                    x = x0
                    break
                h = lam[i + 1] - lam[i]
                e = -alpha[i + 1] * math.expm1(-h)  # −α'(e^{−h} − 1)
                x = (sigma[i + 1] / sigma[i]) * x + e * x0
                if i > 0:
                    r0 = (lam[i] - lam[i - 1]) / h
                    x = x + (0.5 * e / r0) * (x0 - x0_prev)
                x0_prev = x0
            return x

    return run


def _cuda_graph(loop, noise):
    """Capture ``loop`` (the eager loop) into a CUDAGraph by hand; returns the replayer."""
    static_noise = noise.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            loop(static_noise)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_noise)

    def replay(n):
        static_noise.copy_(n)
        graph.replay()
        return static_out

    replay.graph = graph  # keep the graph alive with the callable
    return replay


def _replay(captured, cond):
    """A captured sampler as a one-argument row (the same cond every call)."""
    return lambda n: captured(n, cond)


# -- the benchmark ---------------------------------------------------------------------------
def _reference(device, head_id, sampler, guidance, noise):
    """``ate_sample``'s output for the case (computed once)."""

    def build():
        head = _head(device, head_id)
        model_fn = _ate_model_fn(head, _time_factor(head_id, sampler))
        enc = None if guidance == "unguided" else _encoder(device, guidance.split("-")[0], head_id)
        ate = _ate_sampler(head_id, sampler, model_fn)
        guide = None if enc is None else enc.guidance
        return ate.sample(noise, _cond(device, head_id), guidance=guide).clone()

    return _cached((device, "reference", head_id, sampler, guidance), build)


def _check(row: str, out: torch.Tensor, ref: torch.Tensor, device: str) -> None:
    scale = float(ref.abs().max())
    err = float((out - ref).abs().max())
    assert torch.isfinite(out).all(), f"{row}: non-finite output"
    assert err <= ATOL_REL[device] * max(scale, 1.0), (
        f"{row} differs from ate_sample: max |Δ| = {err:.3g} (max |ref| = {scale:.3g})"
    )


@pytest.fixture(scope="module", autouse=True)
def _announce(request):
    """Print the plan (compile count, time estimate) for the selected tests."""
    mine = [
        tuple(item.callspec.params[k] for k in ("device", "head", "sampler", "guidance", "row"))
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    ]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{plan(mine)}", flush=True)
    yield


@pytest.mark.parametrize(
    "device,head,sampler,guidance,row", CASES, ids=["-".join(c) for c in CASES]
)
def test_head_sampler_latency(benchmark, monkeypatch, device, head, sampler, guidance, row):
    if time.monotonic() - _STARTED > BUDGET_S:
        pytest.skip(f"ATE_FAST_HEADS_BUDGET_S={BUDGET_S:.0f} s spent")
    horizon, action_dim = _shape(head)
    benchmark.group = f"{device} {head} {sampler} {guidance} B={B} H={horizon} D={action_dim}"
    benchmark.extra_info.update(
        impl=row, suite="heads", device=device, head=head, sampler=sampler, guidance=guidance,
        calls=1, H=horizon, D=action_dim,
    )  # fmt: skip
    noise = torch.randn(B, horizon, action_dim, generator=torch.Generator().manual_seed(1))
    noise = noise.to(device)
    factor = _time_factor(head, sampler)
    cond = _cond(device, head)
    enc = None if guidance == "unguided" else _encoder(device, guidance.split("-")[0], head)
    ref = _reference(device, head, sampler, guidance, noise)

    if row in ("ate_sample", "ate_capture", "ate_capture_compiled", "ate_capture_triton"):
        compiled = row == "ate_capture_compiled"
        model = _compiled_head(device, head, "default") if compiled else _head(device, head)
        ate = _ate_sampler(head, sampler, _ate_model_fn(model, factor))
        ate_guidance = None if enc is None else enc.guidance
        if row == "ate_sample":
            fn = lambda n: ate.sample(n, cond, guidance=ate_guidance)  # noqa: E731
        elif compiled:  # the guidance path is read while capturing (warm-up compiles it)
            monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "compiled")
            fn = _replay(ate.capture(noise, cond, guidance=ate_guidance, check_finite=False), cond)
        else:
            if row == "ate_capture_triton":  # read while capturing, like "compiled"
                monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "triton")
            fn = _replay(ate.capture(noise, cond, guidance=ate_guidance, check_finite=False), cond)
    elif row == "compile":
        gradient = None if enc is None else enc.compiled_gradient()
        model = _compiled_head(device, head)
        fn = _user_loop(model, sampler, factor, gradient, device, device == "cuda", cond)
    else:
        gradient = None if enc is None else enc.autograd_gradient
        fn = _user_loop(_head(device, head), sampler, factor, gradient, device, cond=cond)
        if row == "cuda_graph":
            fn = _cuda_graph(fn, noise)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        out = fn(noise)
        sync()
        return out

    for _ in range(2):  # warm-up: compile / record / capture
        call()
    _check(row, call(), ref, device)
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    rounds = int(min(MAX_ROUNDS[device], max(3, ROW_SECONDS[device] / max(once, 1e-6))))
    benchmark.extra_info["rounds"] = rounds
    benchmark.pedantic(call, rounds=rounds)  # warmed up above


if __name__ == "__main__":
    print(plan())
    print(f"(CPU default subset: {plan(_cases('cpu', full=False))})")
