"""Bad input to the fused ops, the samplers, the guidance and the ONNX Runtime runner:
each case → the named exception class of :mod:`ate_fast.errors` and a message fragment
(issue 15). Every named error is also the builtin it replaces (checked once below)."""

from __future__ import annotations

import math
import pathlib
from typing import Callable

import pytest
import torch
from torch import nn

import ate_fast
from ate_fast.align.mlp_vae import MLPEncoder
from ate_fast.errors import (
    ArgumentTypeError,
    AteFastError,
    BackendUnavailableError,
    InvalidArgumentError,
    LimitExceededError,
    MissingConditionError,
    NonFiniteError,
)
from ate_fast.models import make_head
from ate_fast.ops.guided_step import guided_step
from ate_fast.ops.mlp_guidance import mlp_guidance
from ate_fast.sampling import MAX_NUM_STEPS, DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.steer import LatentGuidance, Steer

B, H, D, DZ = 2, 4, 3, 2
NAN = float("nan")


def chunk(batch: int = B, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, H, D, dtype=dtype)


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = NAN
    return t


def mlp_weights(widths=(H * D, 5, 2 * DZ), dtype=torch.float32):
    ws = [torch.randn(o, i, dtype=dtype) for i, o in zip(widths, widths[1:])]
    return ws, [None] * len(ws)


def zero_model(x, t, cond):
    return torch.zeros_like(x)


def flow(num_steps: int = 3, model=zero_model) -> FlowSampler:
    return FlowSampler(model, num_steps)


def guidance(scale=1.0, clamp=0.5) -> LatentGuidance:
    return LatentGuidance(MLPEncoder(D, H, DZ, (5,)), torch.zeros(DZ), scale=scale, clamp=clamp)


class NanGuidance:
    scale, clamp, mode = 1.0, math.inf, "direct"

    def gradient(self, x, x0_hat, dx0_dx):
        return torch.full_like(x, NAN)


def nan_after(step: int):
    calls = []

    def model(x, t, cond):
        calls.append(1)
        out = torch.zeros_like(x)
        if len(calls) > step:
            out.view(-1)[0] = NAN
        return out

    return model


def call_head(head: nn.Module) -> torch.Tensor:
    """Call a reference head on well-formed x and t, without cond."""
    cfg = head.config
    return head(torch.randn(B, cfg.horizon, cfg.action_dim), torch.rand(B), None)


ws, bs = mlp_weights()
CASES: list[tuple[str, Callable[[], object], type, str]] = [
    # ---------------------------------------------------------------- guided_step
    ("gs m not a tensor", lambda: guided_step(None, [1.0]), ArgumentTypeError, "m must be"),
    ("gs m scalar", lambda: guided_step(None, torch.tensor(1.0)), InvalidArgumentError, "batch"),
    ("gs int dtype", lambda: guided_step(None, torch.ones(B, H, D, dtype=torch.int32)),
     ArgumentTypeError, "float32, float64"),
    ("gs x shape", lambda: guided_step(chunk()[:, :2], chunk(), a=1.0), InvalidArgumentError,
     "x must have the shape of m"),
    ("gs x dtype", lambda: guided_step(chunk(dtype=torch.float64), chunk(), a=1.0),
     ArgumentTypeError, "x must have m's dtype"),
    ("gs x non-contiguous", lambda: guided_step(chunk().transpose(1, 2).contiguous()
                                                .transpose(1, 2), chunk(), a=1.0),
     InvalidArgumentError, "x must be contiguous"),
    ("gs a without x", lambda: guided_step(None, chunk(), a=1.0), InvalidArgumentError,
     "a was given but x is None"),
    ("gs x without a", lambda: guided_step(chunk(), chunk()), InvalidArgumentError,
     "coefficient a is required"),
    ("gs b wrong type", lambda: guided_step(None, chunk(), b="1"), ArgumentTypeError,
     "b must be a [B] tensor or a float"),
    ("gs b wrong shape", lambda: guided_step(None, chunk(), b=torch.ones(B + 1)),
     InvalidArgumentError, "b must have shape [B]"),
    ("gs b wrong dtype", lambda: guided_step(None, chunk(), b=torch.ones(B, dtype=torch.float64)),
     ArgumentTypeError, "b must be torch.float32"),
    ("gs scale nan", lambda: guided_step(None, chunk(), g=chunk(), scale=NAN),
     InvalidArgumentError, "scale (λ) must be finite"),
    ("gs scale inf", lambda: guided_step(None, chunk(), g=chunk(), scale=math.inf),
     InvalidArgumentError, "scale (λ) must be finite"),
    ("gs clamp negative", lambda: guided_step(None, chunk(), g=chunk(), clamp=-1.0),
     InvalidArgumentError, "clamp (κ) must be >= 0"),
    ("gs clamp nan", lambda: guided_step(None, chunk(), g=chunk(), clamp=NAN),
     InvalidArgumentError, "clamp (κ) must be >= 0"),
    ("gs out shape", lambda: guided_step(None, chunk(), out=torch.empty(B, H)),
     InvalidArgumentError, "out must have the shape of m"),
    ("gs out wrong type", lambda: guided_step(None, chunk(), out=[0.0]), ArgumentTypeError,
     "out must be a torch.Tensor"),
    # ---------------------------------------------------------------- mlp_guidance
    ("mg x not a tensor", lambda: mlp_guidance([1.0], ws, bs, target=torch.zeros(DZ)),
     ArgumentTypeError, "x must be a torch.Tensor"),
    ("mg x rank", lambda: mlp_guidance(torch.randn(B, H * D), ws, bs, target=torch.zeros(DZ)),
     InvalidArgumentError, "x must be [B, H, D]"),
    ("mg x 0-dim", lambda: mlp_guidance(torch.tensor(1.0), ws, bs, target=torch.zeros(DZ)),
     InvalidArgumentError, "x must be [B, H, D], got shape ()"),
    ("mg x 0-dim, op", lambda: torch.ops.ate_fast.mlp_guidance(
        torch.tensor(1.0), ws, bs, 0, torch.zeros(DZ), None, None, None, 1.0),
     InvalidArgumentError, "x must be [B, H, D], got shape ()"),
    ("mg weight not a tensor", lambda: mlp_guidance(chunk(), [ws[0], 1.0], bs,
                                                    target=torch.zeros(DZ)),
     ArgumentTypeError, "weights[1] must be a torch.Tensor, got float"),
    ("mg bias not a tensor", lambda: mlp_guidance(chunk(), ws, [bs[0], "0"],
                                                  target=torch.zeros(DZ)),
     ArgumentTypeError, "biases[1] must be a torch.Tensor or None, got str"),
    ("mg x int", lambda: mlp_guidance(torch.ones(B, H, D, dtype=torch.int64), ws, bs,
                                      target=torch.zeros(DZ)), ArgumentTypeError, "float32"),
    ("mg activation", lambda: mlp_guidance(chunk(), ws, bs, "elu", target=torch.zeros(DZ)),
     InvalidArgumentError, "activation must be one of"),
    ("mg no layers", lambda: mlp_guidance(chunk(), [], [], target=torch.zeros(DZ)),
     InvalidArgumentError, "1..16 weights"),
    ("mg too many layers", lambda: mlp_guidance(chunk(), *mlp_weights((H * D,) + (4,) * 17),
                                                target=torch.zeros(2)),
     LimitExceededError, "1..16 weights"),
    ("mg weight width", lambda: mlp_guidance(chunk(), *mlp_weights((H * D + 1, 4)),
                                             target=torch.zeros(2)),
     InvalidArgumentError, "weights[0] must be [out, 12]"),
    ("mg zero-width layer", lambda: mlp_guidance(chunk(), *mlp_weights((H * D, 0, 4)),
                                                 target=torch.zeros(2)),
     InvalidArgumentError, "zero-width layer"),
    ("mg zero-width input", lambda: mlp_guidance(torch.randn(B, 0, D), *mlp_weights((0, 4)),
                                                 target=torch.zeros(2)),
     InvalidArgumentError, "zero-width layer"),
    ("mg odd last layer", lambda: mlp_guidance(chunk(), *mlp_weights((H * D, 3)),
                                               target=torch.zeros(1)),
     InvalidArgumentError, "2·d_z"),
    ("mg weight dtype", lambda: mlp_guidance(chunk(), *mlp_weights(dtype=torch.float64),
                                             target=torch.zeros(DZ)),
     ArgumentTypeError, "weights[0] must have x's dtype"),
    ("mg target and a0", lambda: mlp_guidance(chunk(), ws, bs, target=torch.zeros(DZ),
                                              a0=chunk()),
     InvalidArgumentError, "exactly one of target"),
    ("mg target shape", lambda: mlp_guidance(chunk(), ws, bs, target=torch.zeros(DZ + 1)),
     InvalidArgumentError, "target must be [d_z]"),
    ("mg mask shape", lambda: mlp_guidance(chunk(), ws, bs, target=torch.zeros(DZ),
                                           mask=torch.ones(D + 1)),
     InvalidArgumentError, "mask must be [D]"),
    ("mg eps shape", lambda: mlp_guidance(chunk(), ws, bs, target=torch.zeros(DZ),
                                          eps=torch.zeros(DZ)),
     InvalidArgumentError, "eps must be [B, d_z]"),
    ("mg distance weight", lambda: mlp_guidance(chunk(), ws, bs, target=torch.zeros(DZ),
                                                distance_weight=math.inf),
     InvalidArgumentError, "distance_weight must be finite"),
    # ---------------------------------------------------------------- samplers
    ("flow model not callable", lambda: FlowSampler(42), ArgumentTypeError,
     "model_fn must be callable"),
    ("flow num_steps type", lambda: FlowSampler(zero_model, 2.5), ArgumentTypeError,
     "num_steps must be an int"),
    ("flow num_steps 0", lambda: FlowSampler(zero_model, 0), InvalidArgumentError,
     "num_steps must be >= 1"),
    ("flow num_steps huge", lambda: FlowSampler(zero_model, 10**9), LimitExceededError,
     f"num_steps must be <= MAX_NUM_STEPS = {MAX_NUM_STEPS}"),
    ("diffusion num_steps huge",
     lambda: DiffusionSampler(zero_model, NoiseSchedule(), num_steps=10**6),
     LimitExceededError, "MAX_NUM_STEPS"),
    ("flow method", lambda: FlowSampler(zero_model, 2, method="rk4"), InvalidArgumentError,
     "method must be one of"),
    ("sample noise type", lambda: flow().sample([0.0]), ArgumentTypeError,
     "noise must be a torch.Tensor"),
    ("sample noise rank", lambda: flow().sample(torch.randn(B, H)), InvalidArgumentError,
     "noise must have shape [B, H, D]"),
    ("sample batch 0", lambda: flow().sample(chunk(batch=0)), InvalidArgumentError,
     "noise must not be empty"),
    ("sample noise int", lambda: flow().sample(torch.ones(B, H, D, dtype=torch.int64)),
     ArgumentTypeError, "noise must be float32"),
    ("sample noise nan", lambda: flow().sample(with_nan(chunk())), NonFiniteError,
     "noise contains NaN"),
    ("sample cond nan", lambda: flow().sample(chunk(), {"obs": with_nan(torch.randn(B, 3))}),
     NonFiniteError, "cond['obs'] contains NaN"),
    ("sample model nan at step 1", lambda: flow(3, nan_after(1)).sample(chunk()),
     NonFiniteError, "step 1: model_fn returned NaN"),
    ("sample guidance nan", lambda: flow().sample(chunk(), guidance=NanGuidance()),
     NonFiniteError, "step 0: guidance.gradient returned NaN"),
    ("sample model wrong shape", lambda: FlowSampler(lambda x, t, c: x[:, :1], 2).sample(chunk()),
     InvalidArgumentError, "model_fn returned shape"),
    ("sample model wrong type", lambda: FlowSampler(lambda x, t, c: 0.0, 2).sample(chunk()),
     ArgumentTypeError, "model_fn must return a torch.Tensor"),
    ("sample guidance not a guidance", lambda: flow().sample(chunk(), guidance=object()),
     ArgumentTypeError, "guidance must follow"),
    ("sample generator type", lambda: flow().sample(chunk(), generator=1), ArgumentTypeError,
     "generator must be a torch.Generator"),
    ("sample callback type", lambda: flow().sample(chunk(), callback=1), ArgumentTypeError,
     "callback must be callable"),
    ("capture noise nan", lambda: flow().capture(with_nan(chunk())), NonFiniteError,
     "noise contains NaN"),
    ("captured call noise shape", lambda: flow().capture(chunk())(chunk(batch=3)),
     InvalidArgumentError, "noise must match the captured example"),
    ("captured call noise nan", lambda: flow().capture(chunk())(with_nan(chunk())),
     NonFiniteError, "noise contains NaN"),
    ("captured steps nan", lambda: flow(3, nan_after(1)).capture(
        chunk(), check_finite_steps=True)(chunk()),
     NonFiniteError, "step 1: model_fn returned NaN or inf in the captured loop"),
    # ---------------------------------------------------------------- steer / guidance
    ("steer path str", lambda: Steer("adapt.ckpt"), ArgumentTypeError,
     "ate_fast.align.load_checkpoint(path)"),
    ("steer path pathlike", lambda: Steer(pathlib.Path("adapt.ckpt")), ArgumentTypeError,
     "load the checkpoint first"),
    ("guidance path str", lambda: LatentGuidance("adapt.ckpt", torch.zeros(DZ)),
     ArgumentTypeError, "ate_fast.align.load_checkpoint(path)"),
    ("steer not an encoder", lambda: Steer(42), ArgumentTypeError, "vae_or_encoder"),
    ("steer scale nan", lambda: Steer(MLPEncoder(D, H, DZ), scale=NAN), InvalidArgumentError,
     "scale must be finite"),
    ("steer clamp negative", lambda: Steer(MLPEncoder(D, H, DZ), clamp=-1.0),
     InvalidArgumentError, "clamp must be >= 0.0 (math.inf: no clamp)"),
    ("guidance target nan", lambda: guidance().set_target(with_nan(torch.zeros(DZ))),
     NonFiniteError, "target contains NaN"),
    ("guidance target type", lambda: guidance().set_target("z"), ArgumentTypeError,
     "target must be a latent tensor"),
    ("guidance target empty", lambda: guidance().set_target(torch.zeros(0)),
     InvalidArgumentError, "target must be a floating latent"),
    ("guidance mode", lambda: LatentGuidance(MLPEncoder(D, H, DZ), torch.zeros(DZ),
                                             mode="sideways"),
     InvalidArgumentError, "mode must be one of"),
    ("steer flow loss nan", lambda: Steer(MLPEncoder(D, H, DZ)).flow_loss(
        with_nan(chunk()), chunk(), chunk(), chunk(), torch.rand(B)),
     NonFiniteError, "v_pred contains NaN or inf"),
    # ---------------------------------------------------------------- reference heads
    ("mlp head without cond", lambda: call_head(make_head("mlp", "small", cond_dim=6)),
     MissingConditionError, "cond is None but this head was built with cond_dim = 6"),
    ("unet head without cond", lambda: call_head(make_head("unet1d", "small")),
     MissingConditionError, "cond is None but this head was built with cond_dim = 32"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_the_named_error(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, AteFastError)


@pytest.mark.parametrize(
    "error, builtin",
    [
        (InvalidArgumentError, ValueError),
        (ArgumentTypeError, TypeError),
        (NonFiniteError, ValueError),
        (LimitExceededError, ValueError),
        (MissingConditionError, ValueError),
        (BackendUnavailableError, RuntimeError),
    ],
)
def test_named_errors_keep_their_builtin(error, builtin):
    assert issubclass(error, AteFastError) and issubclass(error, builtin)
    assert ate_fast.errors.AteFastError is AteFastError
    assert ate_fast.ops.BackendUnavailableError is BackendUnavailableError


def test_forced_backend_unavailable(monkeypatch):
    monkeypatch.setenv("ATE_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="ATE_FAST_BACKEND=cuda"):
        guided_step(None, chunk())


def test_forced_backend_without_the_dtype_names_it(monkeypatch):
    """The C++ backend has no half kernels: the error says float16, not just "cpu"."""
    monkeypatch.setenv("ATE_FAST_BACKEND", "cpu")
    half = chunk().half()
    with pytest.raises(BackendUnavailableError,
                       match="no cpu implementation for float16 cpu tensors"):  # fmt: skip
        guided_step(None, half, b=1.0)
    with pytest.raises(BackendUnavailableError,
                       match="no cpu implementation for float16 cpu tensors"):  # fmt: skip
        mlp_guidance(half, [w.half() for w in ws], [b if b is None else b.half() for b in bs],
                     target=torch.zeros(DZ, dtype=torch.float16))  # fmt: skip


def test_unknown_forced_backend(monkeypatch):
    monkeypatch.setenv("ATE_FAST_BACKEND", "tpu")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_BACKEND must be one of"):
        guided_step(None, chunk())


@pytest.mark.parametrize("shape", [(0, H, D), (B, 0, D), (B, H, 0)])
def test_guided_step_empty_is_empty_everywhere(shape, monkeypatch):
    """B = 0 or a zero-width row: an empty result on every backend."""
    for backend in ("ref", "cpu", "triton"):
        monkeypatch.setenv("ATE_FAST_BACKEND", backend)
        m = torch.randn(shape)
        out = guided_step(m, m, a=0.5, b=1.0, g=m, scale=2.0, clamp=0.1)
        assert out.shape == shape


def test_huge_clamp_is_no_clamp_on_every_backend_and_in_steer(monkeypatch):
    x, m, g = chunk(), chunk(), chunk() * 100
    expected = guided_step(x, m, a=0.5, b=1.0, g=g, scale=2.0, clamp=math.inf)
    for backend in ("ref", "cpu", "triton"):
        monkeypatch.setenv("ATE_FAST_BACKEND", backend)
        for clamp in (3.4028234663852886e38, 1e39, 1e300, math.inf):
            out = guided_step(x, m, a=0.5, b=1.0, g=g, scale=2.0, clamp=clamp)
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    steer = Steer(MLPEncoder(D, H, DZ), clamp=1e39)
    loss = steer.flow_loss(chunk(), chunk(), chunk(), chunk(), torch.rand(B))
    assert torch.isfinite(loss.loss)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "tanh"])
def test_mlp_guidance_nan_input_propagates_on_every_backend(activation, monkeypatch):
    weights, biases = mlp_weights((H * D, 5, 5, 2 * DZ))
    x = with_nan(chunk())
    results = {}
    for backend in ("ref", "cpu", "triton"):
        monkeypatch.setenv("ATE_FAST_BACKEND", backend)
        g, z = mlp_guidance(x, weights, biases, activation, target=torch.zeros(DZ))
        results[backend] = (g.isnan(), z.isnan())
        assert bool(z.isnan().any()), f"{backend}/{activation}: NaN input gave a finite z"
    for backend in ("cpu", "triton"):
        assert torch.equal(results[backend][0], results["ref"][0]), (backend, activation)
        assert torch.equal(results[backend][1], results["ref"][1]), (backend, activation)


def test_mlp_guidance_batch_zero_is_empty_everywhere(monkeypatch):
    for backend in ("ref", "cpu", "triton"):
        monkeypatch.setenv("ATE_FAST_BACKEND", backend)
        g, z = mlp_guidance(chunk(batch=0), ws, bs, target=torch.zeros(DZ))
        assert g.shape == (0, H, D) and z.shape == (0, DZ)


def test_partial_overlap_reproducer_on_every_backend(monkeypatch):
    """issue 15: out= partly overlapping x gave wrong numbers on cpu and triton."""
    for backend in ("ref", "cpu", "triton"):
        monkeypatch.setenv("ATE_FAST_BACKEND", backend)
        gen = torch.Generator().manual_seed(0)
        buf, m = torch.randn(9, 8192, generator=gen), torch.randn(8, 8192, generator=gen)
        expected = 0.5 * buf[:-1] + m
        guided_step(buf[:-1], m, a=0.5, b=1.0, out=buf[1:])
        torch.testing.assert_close(buf[1:], expected, rtol=1e-6, atol=1e-6)


def test_sampler_check_finite_can_be_turned_off():
    out = flow(3, nan_after(1)).sample(chunk(), check_finite=False)
    assert bool(out.isnan().any())
    captured = flow(3, nan_after(1)).capture(chunk())  # check_finite_steps off: no raise
    assert bool(captured(chunk()).isnan().any())


def test_onnx_runtime_runner_refuses_nan_and_batch_zero(tmp_path):
    from ate_fast.export import OnnxRuntimeSampler, to_onnx  # onnx is optional

    sampler = FlowSampler(lambda x, t, cond: -x * t[:, None, None], 2)
    path = to_onnx(sampler, tmp_path / "flow.onnx", chunk())
    runner = OnnxRuntimeSampler(path)
    assert runner.sample(chunk()).shape == (B, H, D)
    with pytest.raises(NonFiniteError, match="noise contains NaN"):
        runner.sample(with_nan(chunk()))
    for call in (sampler.sample, runner.sample):  # batch 0: the same error for both
        with pytest.raises(InvalidArgumentError, match="noise must not be empty"):
            call(chunk(batch=0))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, -2.0, 3.0], True),
        ([3e38, 3e38, 3e38], True),  # the sum overflows, every element is finite
        ([-3e38, -3e38], True),
        ([1.0, math.nan, 2.0], False),
        ([1.0, math.inf], False),
        ([-math.inf, 0.0], False),
        ([math.inf, -math.inf], False),  # the sum is NaN
        ([3e38, 3e38, math.nan], False),
        ([], True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_is_exact(values, expected, dtype):
    from ate_fast.sampling.inputs import all_finite

    t = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert all_finite(t) == bool(torch.isfinite(t).all()) == expected
    assert all_finite(torch.complex(t.float(), torch.zeros_like(t.float()))) == expected
