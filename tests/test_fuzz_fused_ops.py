"""Property-based fuzzing of the fused ops against their PyTorch reference, per CPU backend.

Each test draws ``CASES[backend]`` random cases from its own seeded generator (no extra
dependency): shapes with B = 0 / 1 / odd sizes, every optional tensor present or absent,
float32 and float64 where the backend has them, and destinations that are fresh, exactly
an input (``out=x``, ``out=m``; ``g`` = ``x``), or partly overlapping an input. The
expected value is always the reference on untouched copies of the inputs. The Triton
interpreter is slow, so its cases are smaller (still 1,000 per op; ≈ 45 s for the file
on 2 busy cores).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from ate_fast.ops import backends
from ate_fast.ops.constants import ACTIVATIONS
from ate_fast.ops.guided_step import guided_step_reference
from ate_fast.ops.guided_step.dispatch import guided_step_into
from ate_fast.ops.mlp_guidance import mlp_guidance_reference
from ate_fast.ops.mlp_guidance.dispatch import mlp_guidance_into

CASES = {"ref": 1000, "cpu": 1500, "triton": 1000}
# the interpreter runs 2·L kernels per MLP guidance call (~25 ms at these sizes)
MLP_CASES = {"ref": 1000, "cpu": 1500, "triton": 1000}
GUIDED_DTYPES = {
    "ref": (torch.float32, torch.float64),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32,),
}
MLP_DTYPES = {
    "ref": (torch.float32, torch.float64),
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float64),
}
GUIDED_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-13, atol=1e-13),
}
MLP_TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
ALIASING = ("fresh", "out=x", "out=m", "partial")


def _need(backend: str) -> None:
    ok, why = backends.availability(backend, "cpu")
    if not ok:
        pytest.fail(f"the {backend} backend must run in this test environment: {why}")


def _batch(rng: random.Random) -> int:
    return rng.choice((0, 1, 1, 2, 3, 5, 7))


def _clamp(rng: random.Random) -> float:
    return rng.choice((math.inf, 0.0, 0.05, 0.5, 3.0, 1e39, 3.5e38))


# -------------------------------------------------------------------- guided_step
def _guided_case(rng: random.Random, gen: torch.Generator, backend: str) -> dict:
    dtype = rng.choice(GUIDED_DTYPES[backend])
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    small = backend == "triton"
    batch = _batch(rng)
    shape = (batch, rng.randint(1, 3 if small else 6), rng.randint(1, 5 if small else 9))

    def data() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    def coef() -> torch.Tensor:
        return (torch.randn(batch, generator=gen, dtype=torch.float64) * 2).to(cd)

    case = {"m": data(), "b": coef(), "scale": rng.uniform(-3, 3), "clamp": _clamp(rng)}
    for name, k in (("x", "a"), ("g", "c"), ("m_prev", "d"), ("z", "s")):
        present = rng.random() < 0.6
        case[name], case[k] = (data(), coef()) if present else (None, None)
    case["aliasing"] = rng.choice(ALIASING if case["x"] is not None else ("fresh", "out=m"))
    return case


GUIDED_NAMES = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s", "scale", "clamp")


def _guided_args(case: dict) -> tuple:
    return tuple(case[k] for k in GUIDED_NAMES)


def _with_destination(case: dict, rng: random.Random) -> torch.Tensor:
    """Rebind ``case``'s tensors so that ``out`` has the case's aliasing; returns out."""
    m = case["m"]
    mode = case["aliasing"]
    if mode == "out=x":
        return case["x"]
    if mode == "out=m":
        return m
    if mode == "fresh":
        return torch.full_like(m, float("nan"))
    # partial: x and out are overlapping windows of one buffer, shifted by whole rows or
    # by a single element; which one comes first is random
    victim = rng.choice([n for n in ("x", "m", "g", "m_prev", "z") if case[n] is not None])
    flat = case[victim].reshape(-1)
    shift = rng.choice((1, max(1, flat.numel() // max(1, m.shape[0]))))
    buf = torch.empty(flat.numel() + shift, dtype=m.dtype)
    first = rng.random() < 0.5
    view = buf[:-shift] if first else buf[shift:]
    view.copy_(flat)
    case[victim] = view.view(m.shape)
    other = buf[shift:] if first else buf[:-shift]
    return other.view(m.shape)


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_guided_step_matches_reference(backend):
    _need(backend)
    rng = random.Random(1500 + len(backend))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    counts = dict.fromkeys(ALIASING, 0)
    for i in range(CASES[backend]):
        case = _guided_case(rng, gen, backend)
        out = _with_destination(case, rng)
        args = _guided_args(case)
        expected = guided_step_reference(*(a.clone() if torch.is_tensor(a) else a for a in args))
        result = guided_step_into(out, *args, backend=backend)
        assert result is out
        try:
            torch.testing.assert_close(out, expected, **GUIDED_TOL[case["m"].dtype])
        except AssertionError as exc:
            shown = {k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in case.items()}
            raise AssertionError(f"{backend} case {i}: {shown}\n{exc}") from None
        counts[case["aliasing"]] += 1
    assert all(counts.values()), counts  # every aliasing mode was exercised


# -------------------------------------------------------------------- mlp_guidance
def _mlp_case(rng: random.Random, gen: torch.Generator, backend: str) -> dict:
    dtype = rng.choice(MLP_DTYPES[backend])
    small = backend == "triton"
    batch = _batch(rng)
    horizon, dim = rng.randint(1, 3 if small else 5), rng.randint(1, 3 if small else 5)
    widths = [horizon * dim]
    for _ in range(rng.randint(0, 1 if small else 3)):
        widths.append(rng.randint(1, 6 if small else 12))
    dz = rng.randint(1, 3 if small else 5)
    widths.append(2 * dz)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    weights = [rand(o, i, scale=1 / math.sqrt(i)) for i, o in zip(widths, widths[1:])]
    biases = [rand(o, scale=0.1) if rng.random() < 0.7 else None for o in widths[1:]]
    case = {
        "x": rand(batch, horizon, dim),
        "weights": weights,
        "biases": biases,
        "activation": rng.randrange(len(ACTIVATIONS)),
        "target": None,
        "a0": None,
        "mask": None,
        "eps": rand(batch, dz) if rng.random() < 0.4 else None,
        "distance_weight": rng.choice((1.0 / dz, 1.0 / max(1, batch * dz), rng.uniform(-2, 2))),
    }
    if rng.random() < 0.6:
        case["target"] = rand(dz) if rng.random() < 0.5 else rand(batch, dz)
    else:
        case["a0"] = rand(batch, horizon, dim)
    if rng.random() < 0.4:
        shape = (dim,) if rng.random() < 0.5 else (batch, dim)
        case["mask"] = (torch.rand(shape, generator=gen) < 0.7).to(dtype)
    case["aliasing"] = rng.choice(("fresh", "g=x", "partial"))
    return case


def _mlp_args(case: dict) -> tuple:
    return (
        case["x"], case["weights"], case["biases"], case["activation"], case["target"],
        case["a0"], case["mask"], case["eps"], case["distance_weight"],
    )  # fmt: skip


def _mlp_outputs(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = case["x"]
    dz = case["weights"][-1].shape[0] // 2
    if case["aliasing"] == "g=x":
        return x, torch.empty(x.shape[0], dz, dtype=x.dtype)
    if case["aliasing"] == "partial":
        # g and z in one buffer together with a copy of x that g overlaps by one element
        n = x.numel()
        buf = torch.empty(2 * n + x.shape[0] * dz + 1, dtype=x.dtype)
        buf[1 : n + 1].copy_(x.reshape(-1))
        case["x"] = buf[1 : n + 1].view(x.shape)
        g = buf[:n].view(x.shape)
        z = buf[n + 1 : n + 1 + x.shape[0] * dz].view(x.shape[0], dz)
        return g, z
    return torch.full_like(x, float("nan")), torch.full(
        (x.shape[0], dz), float("nan"), dtype=x.dtype
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("backend", ["ref", "cpu", "triton"])
def test_mlp_guidance_matches_reference(backend):
    _need(backend)
    rng = random.Random(2600 + len(backend))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for i in range(MLP_CASES[backend]):
        case = _mlp_case(rng, gen, backend)
        g, z = _mlp_outputs(case)
        args = _mlp_args(case)
        clones = [a.clone() if torch.is_tensor(a) else a for a in args]
        g_ref, z_ref = mlp_guidance_reference(
            clones[0], args[1], args[2], ACTIVATIONS[case["activation"]], *clones[4:]
        )
        mlp_guidance_into(g, z, *args, backend=backend)
        tol = MLP_TOL[case["x"].dtype]
        if not (_rel(g, g_ref) < tol and _rel(z, z_ref) < tol):
            shown = {
                k: (tuple(v.shape) if torch.is_tensor(v) else v)
                for k, v in case.items()
                if k not in ("weights", "biases")
            }
            widths = [tuple(w.shape) for w in case["weights"]]
            raise AssertionError(
                f"{backend} case {i}: {shown} layers {widths}: "
                f"g rel err {_rel(g, g_ref):.3g}, z rel err {_rel(z, z_ref):.3g}"
            )
