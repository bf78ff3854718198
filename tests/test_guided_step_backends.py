"""Every guided_step backend against the PyTorch reference (float64 where it allows)."""

from __future__ import annotations

import pytest
import torch
from guided_step_cases import ALL_SUBSETS, make_inputs, ordered

from ate_fast.ops import backends
from ate_fast.ops.guided_step import guided_step_into
from ate_fast.ops.guided_step.ref import guided_step_reference

SHAPES = [
    (1, 50, 32),  # π0 chunk
    (1, 1, 1),
    (3, 7, 5),  # odd H and D: no vector path
    (2, 13),  # rank 2
    (4, 3, 5, 7),  # rank 4
    (64, 16, 14),  # Diffusion Policy
    (5, 64, 128),  # RDT; rows a multiple of every vector width
    (3, 40001),  # several OpenMP chunks per row, odd tail
    (70, 1000),  # over the OpenMP threshold, many rows
]

# (backend, device, dtype, tolerance vs the reference computed in the same compute dtype)
CPU_CASES = [
    ("cpu", "cpu", torch.float64, dict(rtol=1e-13, atol=1e-13)),
    ("cpu", "cpu", torch.float32, dict(rtol=1e-6, atol=1e-6)),
    ("triton", "cpu", torch.float32, dict(rtol=1e-6, atol=1e-6)),
]
CUDA_CASES = [
    ("cuda", "cuda", torch.float64, dict(rtol=1e-13, atol=1e-13)),
    ("cuda", "cuda", torch.float32, dict(rtol=1e-6, atol=1e-6)),
    # Half types: both compute in float32 and round once; FMA contraction may move the
    # float32 result by an ulp, which can flip one rounding of the half output.
    ("cuda", "cuda", torch.float16, dict(rtol=1e-3, atol=1e-3)),
    ("cuda", "cuda", torch.bfloat16, dict(rtol=8e-3, atol=8e-3)),
    ("triton", "cuda", torch.float32, dict(rtol=1e-6, atol=1e-6)),
    ("triton", "cuda", torch.float16, dict(rtol=1e-3, atol=1e-3)),
    ("triton", "cuda", torch.bfloat16, dict(rtol=8e-3, atol=8e-3)),
]
CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}") for c in CPU_CASES] + [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-{str(c[2])[6:]}", marks=pytest.mark.cuda)
    for c in CUDA_CASES
]


def _require(backend: str, device: str) -> None:
    if backend == "triton" and device == "cpu" and not backends.triton_interpret():
        pytest.skip(
            "Triton CPU interpreter is off (TRITON_INTERPRET=0); "
            "the cuda-marked triton cases run instead"
        )
    if backend == "triton":  # an older Triton is refused by design (backends.MIN_TRITON)
        pytest.importorskip("triton", minversion=backends.MIN_TRITON)
    ok, why = backends.availability(backend, device)
    assert ok, f"{backend} backend should be available on {device}: {why}"


def _run(backend, args, out_buffer):
    guided_step_into(out_buffer, *ordered(args), backend=backend)
    return out_buffer


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_all_terms(backend, device, dtype, tol, shape):
    _require(backend, device)
    args = make_inputs(shape, dtype, device)
    expected = guided_step_reference(*ordered(args))
    poisoned = torch.full(shape, float("nan"), dtype=dtype, device=device)
    out = _run(backend, args, poisoned)
    assert not out.isnan().any(), "some output elements were never written"
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
@pytest.mark.parametrize("present", ALL_SUBSETS, ids=lambda p: "+".join(sorted(p)) or "m-only")
def test_optional_terms(backend, device, dtype, tol, present):
    _require(backend, device)
    args = make_inputs((3, 9, 8), dtype, device, present=present)
    expected = guided_step_reference(*ordered(args))
    out = _run(backend, args, torch.full_like(args["m"], float("nan")))
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
@pytest.mark.parametrize("clamp", [0.0, 0.05, float("inf")])
@pytest.mark.parametrize("scale", [-2.0, 0.0, 3.0])
def test_clamp_and_scale(backend, device, dtype, tol, clamp, scale):
    _require(backend, device)
    args = make_inputs((2, 50, 32), dtype, device, scale=scale, clamp=clamp)
    expected = guided_step_reference(*ordered(args))
    torch.testing.assert_close(_run(backend, args, torch.empty_like(args["m"])), expected, **tol)


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
def test_writes_only_its_output(backend, device, dtype, tol):
    """The output is a view in the middle of a larger buffer: the guards stay intact."""
    _require(backend, device)
    shape = (3, 17, 8)
    args = make_inputs(shape, dtype, device)
    n = args["m"].numel()
    buffer = torch.full((n + 64,), 7.0, dtype=dtype, device=device)
    out = buffer[32 : 32 + n].view(shape)
    _run(backend, args, out)
    assert (buffer[:32] == 7.0).all() and (buffer[32 + n :] == 7.0).all()
    torch.testing.assert_close(out, guided_step_reference(*ordered(args)), **tol)


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
def test_nan_propagates_like_torch_clamp(backend, device, dtype, tol):
    _require(backend, device)
    args = make_inputs((2, 4, 8), dtype, device)
    args["g"][0, 1, 2] = float("nan")
    args["m"][1, 3, 7] = float("nan")
    out = _run(backend, args, torch.zeros_like(args["m"]))
    expected = guided_step_reference(*ordered(args))
    assert torch.equal(out.isnan(), expected.isnan())
    assert out.isnan().sum() == 2


@pytest.mark.parametrize(("backend", "device", "dtype", "tol"), CASES)
def test_in_place_update_of_x(backend, device, dtype, tol):
    _require(backend, device)
    args = make_inputs((4, 50, 32), dtype, device)
    expected = guided_step_reference(*ordered(args))
    _run(backend, args, args["x"])  # out aliases x: x ← a·x + …
    torch.testing.assert_close(args["x"], expected, **tol)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.cuda
def test_half_precision_error_rule(backend, dtype):
    """Kernel error vs a float64 reference ≤ 2× the error of eager PyTorch at that dtype."""
    args = make_inputs((8, 50, 32), dtype, "cuda")
    args64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    exact = guided_step_reference(*ordered(args64))
    x, m, a, b, g, c, mp, d, z, s, scale, clamp = ordered(args)

    def rows(t):
        return t.to(dtype)[:, None, None]

    # what a user would write: the op sequence in the data dtype
    eager = rows(a) * x + rows(b) * (m + scale * torch.clamp(rows(c) * g, -clamp, clamp))
    eager = eager + rows(d) * mp + rows(s) * z
    out = _run(backend, args, torch.empty_like(args["m"]))
    kernel_err = (out.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    assert kernel_err <= 2 * eager_err, (kernel_err, eager_err)


@pytest.mark.cuda
def test_cuda_graph_capture_with_out():
    import ate_fast

    args = make_inputs((2, 50, 32), torch.float32, "cuda")
    out = torch.empty_like(args["m"])
    kwargs = {k: args[k] for k in ("a", "b", "g", "c", "m_prev", "d", "z", "s", "scale", "clamp")}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ate_fast.guided_step(args["x"], args["m"], out=out, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ate_fast.guided_step(args["x"], args["m"], out=out, **kwargs)
    args["m"].copy_(torch.randn_like(args["m"]))  # new data in the static input
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, guided_step_reference(*ordered(args)), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_cuda_respects_current_device_and_stream():
    import ate_fast

    args = make_inputs((2, 8, 8), torch.float32, "cuda")
    before = torch.cuda.current_device()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ate_fast.guided_step(
            args["x"], args["m"], a=args["a"], b=args["b"], g=args["g"], c=args["c"]
        )
    stream.synchronize()
    assert torch.cuda.current_device() == before
    expected = guided_step_reference(
        args["x"], args["m"], args["a"], args["b"], args["g"], args["c"], scale=1.0
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
