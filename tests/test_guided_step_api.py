"""guided_step's public API: validation, dispatch, torch.library, compile and export."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from guided_step_cases import make_inputs, ordered

import ate_fast
from ate_fast import native
from ate_fast.ops import BackendUnavailableError, backends, guided_step_reference
from ate_fast.ops.guided_step import guided_step, selected_backend


@pytest.fixture(autouse=True)
def _fresh_backend_caches():
    backends.reset_caches()
    yield
    backends.reset_caches()


def _kw(args):
    return {k: args[k] for k in ("a", "b", "g", "c", "m_prev", "d", "z", "s", "scale", "clamp")}


# ---------------------------------------------------------------- semantics of the API
def test_float_coefficients_broadcast_to_batch():
    x, m, g = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    out = guided_step(x, m, a=0.5, b=-0.25, g=g, c=2.0, scale=1.5, clamp=0.3)
    expected = 0.5 * x - 0.25 * (m + 1.5 * torch.clamp(2.0 * g, -0.3, 0.3))
    torch.testing.assert_close(out, expected)


def test_defaults_are_the_steer_correction():
    """x absent, b = 1, c = 1 by default: m + λ·clamp(g, −κ, κ)."""
    m, g = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    torch.testing.assert_close(
        guided_step(None, m, g=g, scale=2.0, clamp=0.1), m + 2.0 * torch.clamp(g, -0.1, 0.1)
    )


def test_out_argument_is_written_and_returned():
    args = make_inputs((2, 5, 4), torch.float32)
    out = torch.full_like(args["m"], float("nan"))
    result = guided_step(args["x"], args["m"], out=out, **_kw(args))
    assert result is out
    torch.testing.assert_close(out, guided_step_reference(*ordered(args)))


def test_out_refuses_autograd():
    m = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="out= does not support autograd"):
        guided_step(None, m, out=torch.empty(2, 3, 4))


def test_empty_batch():
    m = torch.randn(0, 5, 4)
    assert guided_step(m, m, a=torch.ones(0)).shape == (0, 5, 4)


# ---------------------------------------------------------------- validation
def _bad(**overrides):
    args = make_inputs((2, 5, 4), torch.float32)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "pattern"),
    [
        (dict(x=torch.randn(2, 5, 3)), ValueError, r"x must have the shape of m \(2, 5, 4\)"),
        (dict(g=torch.randn(2, 5, 4, dtype=torch.float64)), TypeError, "g must have m's dtype"),
        (
            dict(m_prev=torch.randn(2, 4, 5).transpose(1, 2)),
            ValueError,
            "m_prev must be contiguous",
        ),
        (dict(z=torch.randn(2, 5, 4), s=None), ValueError, "coefficient s is required"),
        (dict(z=None), ValueError, "s was given but z is None"),
        (dict(a=torch.randn(3)), ValueError, r"a must have shape \[B\] = \[2\]"),
        (dict(b=torch.randn(2, dtype=torch.float64)), TypeError, "b must be torch.float32"),
        (dict(c=torch.randn(4)[::2]), ValueError, "c must be contiguous"),
        (dict(clamp=-0.1), ValueError, "clamp \\(κ\\) must be >= 0"),
        (dict(clamp=math.nan), ValueError, "clamp \\(κ\\) must be >= 0"),
        (dict(scale=math.inf), ValueError, "scale \\(λ\\) must be finite"),
        (dict(m=torch.randn(2, 5, 4).to(torch.int32)), TypeError, "m must be float32, float64"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, pattern):
    args = _bad(**overrides)
    with pytest.raises(error, match=pattern):
        guided_step(args["x"], args["m"], **_kw(args))
    with pytest.raises(error, match=pattern):  # the registered op validates too
        torch.ops.ate_fast.guided_step(*ordered(args))


def test_bad_types():
    with pytest.raises(TypeError, match=r"m must be a torch\.Tensor"):
        guided_step(None, [1.0, 2.0])
    with pytest.raises(TypeError, match=r"b must be a \[B\] tensor or a float"):
        guided_step(None, torch.randn(2, 3), b="1")
    with pytest.raises(ValueError, match="m must have a batch dimension"):
        guided_step(None, torch.tensor(1.0))


def test_device_mismatch_is_reported():
    meta = torch.empty(2, 5, 4, device="meta")
    with pytest.raises(ValueError, match="x must be on m's device cpu"):
        guided_step(meta, torch.randn(2, 5, 4), a=1.0)


# ---------------------------------------------------------------- dispatch
def test_default_backend_on_cpu_is_native():
    assert selected_backend(torch.empty(1, dtype=torch.float32)) == "cpu"
    assert selected_backend(torch.empty(1, dtype=torch.float64)) == "cpu"
    # no native half kernels on the CPU: the reference runs
    assert selected_backend(torch.empty(1, dtype=torch.bfloat16)) == "ref"


@pytest.mark.parametrize("name", ["ref", "cpu", "triton"])
def test_forced_backend_runs(monkeypatch, name):
    if name == "triton" and not backends.triton_interpret():
        pytest.skip("Triton CPU interpreter is off (TRITON_INTERPRET=0)")
    monkeypatch.setenv("ATE_FAST_BACKEND", name)
    assert selected_backend(torch.empty(1)) == name
    args = make_inputs((2, 50, 32), torch.float32)
    torch.testing.assert_close(
        guided_step(args["x"], args["m"], **_kw(args)), guided_step_reference(*ordered(args))
    )


def test_forced_backend_unavailable_raises(monkeypatch):
    args = make_inputs((2, 3, 4), torch.float32)
    monkeypatch.setenv("ATE_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="ATE_FAST_BACKEND=cuda"):
        guided_step(args["x"], args["m"], **_kw(args))
    monkeypatch.setenv("ATE_FAST_BACKEND", "cpu")
    half = torch.randn(2, 3, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="no cpu implementation"):
        guided_step(None, half)


@pytest.mark.parametrize("version", ["3.0.0", "3.1.0", "3.4.0", "2.3.1", "3.1.0+git9a2b"])
def test_a_triton_older_than_the_minimum_is_unavailable(monkeypatch, version):
    """Triton 3.0 / 3.1 (torch 2.4 / 2.5's) fail on every kernel here (their JIT takes the
    modules' string annotations for run-time arguments), 3.2 – 3.4 on the float64 dots: the
    backend is refused, by name and version, and a default falls back to the next one."""
    pytest.importorskip("triton")
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    backends.reset_caches()
    try:
        ok, why = backends.availability("triton", "cpu")
        assert not ok and f"triton {version} is older than {backends.MIN_TRITON}" in why
        expected = re.escape(f"X=on is unavailable: triton {version} is older")
        with pytest.raises(BackendUnavailableError, match=expected):
            backends.require_triton("cpu", "X=on")
        args = make_inputs((2, 5, 4), torch.float32)
        assert backends.select("cpu", backends.support(triton=("cpu",))) == "ref"
        torch.testing.assert_close(
            guided_step(args["x"], args["m"], **_kw(args)), guided_step_reference(*ordered(args))
        )
    finally:
        backends.reset_caches()


@pytest.mark.parametrize("version", ["3.5.0", "3.6.0", "3.9.0", "4.0.0+cu13", "3.10.1"])
def test_a_triton_at_or_above_the_minimum_is_available(monkeypatch, version):
    pytest.importorskip("triton")
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    backends.reset_caches()
    try:
        assert backends.availability("triton", "cpu") == (True, "ok")  # the interpreter's
    finally:
        backends.reset_caches()


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("ATE_FAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="ATE_FAST_BACKEND must be one of"):
        guided_step(None, torch.randn(2, 3))


def test_broken_native_module_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "_warned", set())
    real = native._load

    def broken(name):
        if name == "_C":
            return None, "native module ate_fast._C is broken: OSError: simulated"
        return real(name)

    monkeypatch.setattr(native, "_load", broken)
    args = make_inputs((2, 5, 4), torch.float32)
    with pytest.warns(RuntimeWarning, match="cpu backend unavailable .*simulated"):
        out = guided_step(args["x"], args["m"], **_kw(args))
    torch.testing.assert_close(out, guided_step_reference(*ordered(args)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        backends.reset_caches()
        guided_step(args["x"], args["m"], **_kw(args))


# ---------------------------------------------------------------- torch.library
OPCHECK_PRESENT = [frozenset(), frozenset({"x"}), frozenset({"x", "g", "m_prev", "z"})]


@pytest.mark.parametrize("present", OPCHECK_PRESENT, ids=lambda p: "+".join(sorted(p)) or "m")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_functional(present, dtype):
    args = make_inputs((2, 5, 4), dtype, present=present)
    for value in args.values():
        if isinstance(value, torch.Tensor):
            value.requires_grad_(True)
    torch.library.opcheck(torch.ops.ate_fast.guided_step.default, ordered(args))


def test_opcheck_out_variant():
    args = make_inputs((2, 5, 4), torch.float32)
    out = torch.empty_like(args["m"])
    torch.library.opcheck(torch.ops.ate_fast.guided_step_out.default, (out, *ordered(args)))


def test_gradcheck_every_tensor_argument():
    args = make_inputs((2, 3, 4), torch.float64, clamp=0.8)
    names = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s")
    tensors = tuple(args[n].requires_grad_(True) for n in names)

    def fn(*ts):
        kw = dict(zip(names, ts))
        return guided_step(kw.pop("x"), kw.pop("m"), scale=args["scale"], clamp=args["clamp"], **kw)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "wanted", [("m",), ("c", "b"), ("g",), ("x", "s"), ("d", "m_prev", "a")], ids="+".join
)
def test_gradients_of_a_subset_of_arguments(wanted):
    """The backward forms only what autograd asks for: each subset's gradients equal the
    ones computed with every argument requiring grad."""
    names = ("x", "m", "a", "b", "g", "c", "m_prev", "d", "z", "s")
    args = make_inputs((2, 3, 4), torch.float64, clamp=0.8)
    weight = torch.randn_like(args["m"])

    def grads(requiring):
        leaves = {n: args[n].detach().clone().requires_grad_(n in requiring) for n in names}
        kw = dict(leaves)
        out = guided_step(kw.pop("x"), kw.pop("m"), scale=args["scale"], clamp=args["clamp"], **kw)
        (out * weight).sum().backward()
        return {n: leaves[n].grad for n in names}

    every, subset = grads(names), grads(wanted)
    for n in names:
        if n in wanted:
            torch.testing.assert_close(subset[n], every[n])
        else:
            assert subset[n] is None


def test_gradient_reaches_pred_through_the_steer_correction():
    pred = torch.randn(4, 8, 3, requires_grad=True)
    g = torch.randn(4, 8, 3)
    c = torch.randn(4)
    corrected = guided_step(None, pred, g=g, c=c, scale=2.0, clamp=0.1)
    target = torch.randn(4, 8, 3)
    ((corrected - target) ** 2).mean().backward()
    expected = 2 * (pred.detach() + 2.0 * torch.clamp(c[:, None, None] * g, -0.1, 0.1) - target)
    torch.testing.assert_close(pred.grad, expected / pred.numel())


def _step(x, m, a, b, g, c):
    return guided_step(x, m, a=a, b=b, g=g, c=c, scale=2.0, clamp=0.5) * 2 + 1


def test_torch_compile_fullgraph_inductor():
    args = make_inputs((2, 50, 32), torch.float32)
    inputs = (args["x"], args["m"], args["a"], args["b"], args["g"], args["c"])
    compiled = torch.compile(_step, fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(*inputs), _step(*inputs))


def test_torch_compile_training_graph():
    args = make_inputs((2, 8, 4), torch.float32)
    m = args["m"].requires_grad_(True)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    compiled(args["x"], m, args["a"], args["b"], args["g"], args["c"]).sum().backward()
    expected = args["b"][:, None, None].expand_as(m) * 2
    torch.testing.assert_close(m.grad, expected)


def test_torch_export_keeps_the_op():
    class Step(torch.nn.Module):
        def forward(self, x, m, a, b, g, c):
            return _step(x, m, a, b, g, c)

    args = make_inputs((2, 50, 32), torch.float32)
    inputs = (args["x"], args["m"], args["a"], args["b"], args["g"], args["c"])
    exported = torch.export.export(Step(), inputs)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "ate_fast.guided_step.default" in targets
    torch.testing.assert_close(exported.module()(*inputs), _step(*inputs))


def test_public_api_is_reexported():
    assert ate_fast.guided_step is guided_step
    assert callable(ate_fast.info)
