"""guided_step: each backend vs the eager PyTorch op sequence it replaces (and torch.compile).

Run:  pytest benchmarks/bench_guided_step.py --benchmark-json=bench_guided_step.json
      python benchmarks/report.py bench_guided_step.json

Each benchmark's group is one (device, dtype, terms, shape) problem; the ``eager`` row is
the baseline measured in the same run. On the GPU every round issues ``CALLS`` calls and
synchronises once, so launch latency (not the synchronisation) is what is measured;
``extra_info["calls"]`` lets the report divide.
"""

from __future__ import annotations

import pytest
import torch

import ate_fast
from ate_fast.ops import backends, guided_step_reference

CPU_SHAPES = [(1, 50, 32), (8, 50, 32), (64, 50, 32), (64, 64, 128), (256, 64, 128)]
GPU_SHAPES = [(1, 50, 32), (64, 50, 32), (64, 64, 128), (1024, 64, 128), (4096, 64, 128)]
TERMS = {"euler": ("x",), "full": ("x", "g", "m_prev", "z")}
HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])
GPU_CALLS = 50


def _problem(shape, dtype, device, terms):
    cd = torch.float64 if dtype == torch.float64 else torch.float32

    def data():
        return torch.randn(shape, dtype=dtype, device=device)

    def coef():
        return torch.rand(shape[0], dtype=cd, device=device) + 0.5

    kw = {"b": coef(), "scale": 2.0, "clamp": 0.1}
    x = data() if "x" in terms else None
    if x is not None:
        kw["a"] = coef()
    for name, c in (("g", "c"), ("m_prev", "d"), ("z", "s")):
        if name in terms:
            kw[name], kw[c] = data(), coef()
    return x, data(), kw


def _eager(x, m, kw):
    """What a user writes without ate_fast (coefficients per sample, data dtype)."""

    def rows(t):
        return t.to(m.dtype)[:, None, None]

    corrected = m
    if "g" in kw:
        corrected = m + kw["scale"] * torch.clamp(
            rows(kw["c"]) * kw["g"], -kw["clamp"], kw["clamp"]
        )
    out = rows(kw["a"]) * x + rows(kw["b"]) * corrected
    if "m_prev" in kw:
        out = out + rows(kw["d"]) * kw["m_prev"]
    if "z" in kw:
        out = out + rows(kw["s"]) * kw["z"]
    return out


# One compiled function for every shape (dynamic=True): the baseline a user gets from
# torch.compile without recompiling per batch size.
_compiled_eager = torch.compile(_eager, dynamic=True)


def _impls(device):
    names = ["eager", "compile"]
    names += ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return names


def _cases():
    for device in DEVICES:
        shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
        dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
        for dtype in dtypes:
            for terms in TERMS:
                for shape in shapes:
                    for impl in _impls(device):
                        yield pytest.param(
                            device, dtype, terms, shape, impl,
                            id="-".join(
                                (device, str(dtype)[6:], terms, "x".join(map(str, shape)), impl)
                            ),
                        )  # fmt: skip


@pytest.mark.parametrize(("device", "dtype", "terms", "shape", "impl"), list(_cases()))
def test_guided_step(benchmark, time_calls, monkeypatch, device, dtype, terms, shape, impl):
    x, m, kw = _problem(shape, dtype, device, TERMS[terms])
    if impl == "eager":
        fn = lambda: _eager(x, m, kw)  # noqa: E731
    elif impl == "compile":
        fn = lambda: _compiled_eager(x, m, kw)  # noqa: E731
    else:
        ok, why = backends.availability(impl, device)
        if not ok:
            pytest.skip(f"{impl} backend unavailable: {why}")
        monkeypatch.setenv("ATE_FAST_BACKEND", impl)
        fn = lambda: ate_fast.guided_step(x, m, **kw)  # noqa: E731
    # Same function as the reference before timing anything (relative norm error: eager
    # bfloat16 rounds after every op, so element-wise tolerances would measure that).
    expected = guided_step_reference(
        x, m, kw.get("a"), kw["b"], kw.get("g"), kw.get("c"), kw.get("m_prev"), kw.get("d"),
        kw.get("z"), kw.get("s"), kw["scale"], kw["clamp"],
    ).double()  # fmt: skip
    error = (fn().double() - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), f"{impl}: relative error {error}"
    benchmark.group = f"{device} {str(dtype)[6:]} {terms} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(
        impl=impl, device=device, dtype=str(dtype)[6:], terms=terms, shape=list(shape)
    )
    time_calls(fn, device, GPU_CALLS, rounds=30)
