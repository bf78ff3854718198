"""ONNX export of real-time chunking: the previous chunk Y and the delay d are graph
inputs, the VJP through the head is its own ``forward_with_vjp`` (forward ops) — or, with
``jacobian=False`` (LeRobot's RTC), there is none and any traceable head exports — and
ONNX Runtime computes what ``FlowSampler.sample(..., guidance=RTCGuidance)`` does."""

from __future__ import annotations

import pytest
import torch

import ate_fast
from ate_fast.errors import InvalidArgumentError
from ate_fast.models import make_head
from ate_fast.realtime import RTCGuidance

onnx = pytest.importorskip("onnx")  # the `test` extra installs onnx, onnxruntime, onnxscript
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ate_fast.export import (  # noqa: E402
    GuidanceExportError,
    OnnxRuntimeSampler,
    read_signature,
    relative_error,
    to_onnx,
)

H, D, S = 16, 4, 5  # horizon, action dim, execution horizon: delays 0..H − S = 11
# max |onnx − torch| / max |torch| in float32 (as tests/test_export_cases.py); measured
# 1.8e-7 (MLP) and 5.5e-6 (flow transformer) on these cases
PARITY_TOLERANCE = 1e-4
HEADS = {
    "mlp": lambda: make_head("mlp", "small", horizon=H, action_dim=D, cond_dim=6),
    "flow-transformer-small": lambda: make_head(
        "flow-transformer", "small", horizon=H, action_dim=D, depth=2
    ),
    "unet1d": lambda: make_head("unet1d", "small", horizon=H, action_dim=D, cond_dim=6),
}
# case -> (head, jacobian): the paper's RTC through the two heads with their own input-VJP;
# LeRobot's (jacobian=False) through the MLP and through the U-Net, which has none
CASES = {
    "mlp": ("mlp", True),
    "flow-transformer-small": ("flow-transformer-small", True),
    "mlp-no-jacobian": ("mlp", False),
    "unet1d-no-jacobian": ("unet1d", False),
}


def _cond(key: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    shape = (batch, 3, 256) if key == "flow-transformer-small" else (batch, 6)
    return torch.randn(shape, generator=gen)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    key, jacobian = CASES[request.param]
    torch.manual_seed(0)
    head = HEADS[key]().eval()
    gen = torch.Generator().manual_seed(1)
    noise, prev = torch.randn(2, H, D, generator=gen), torch.randn(2, H, D, generator=gen)
    cond = _cond(key, 2, gen)
    # Heun, 2 steps: the guidance runs at an Euler predictor and a corrector stage (three
    # head calls); 4 steps made the same graph 2.3x larger and its export 2.1x slower
    sampler = ate_fast.FlowSampler(head, num_steps=2, method="heun")
    rtc = RTCGuidance(prev, 2, execution_horizon=S, jacobian=jacobian)
    path = to_onnx(sampler, tmp_path_factory.mktemp("rtc") / "rtc.onnx", noise, cond, rtc)
    return key, sampler, rtc, path, (noise, cond, prev)


def test_graph_takes_prev_chunk_and_delay(exported):
    _, _, rtc, path, _ = exported
    signature = read_signature(path)
    assert signature.input_names == ["noise", "cond", "prev_chunk", "delay"]
    assert signature.guidance["guidance"] == "rtc"
    assert signature.guidance["mode"] == rtc.mode  # "policy_vjp", or "tweedie" without it
    assert signature.guidance["max_delay"] == H - S
    model = onnx.load(str(path))
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types["delay"] == onnx.TensorProto.INT64
    assert types["prev_chunk"] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("delay", [0, 3, [1, 9]], ids=["d0", "d3", "per-sample"])
def test_onnxruntime_matches_pytorch_for_every_delay(exported, delay):
    key, sampler, rtc, path, (noise, cond, prev) = exported
    runner = OnnxRuntimeSampler(path)
    rtc.set_prefix(prev, delay)
    with torch.no_grad():
        want = sampler.sample(noise, cond, guidance=rtc).clone()
        unguided = sampler.sample(noise, cond)
    got = runner.sample(noise, cond, guidance=rtc)  # feeds rtc.prev_chunk and rtc.delays
    assert relative_error(got, want) < PARITY_TOLERANCE, key
    assert relative_error(unguided, want) > 1e-2  # the guidance acts
    explicit = runner.sample(noise, cond, prev_chunk=prev, delay=torch.tensor(delay))
    assert torch.equal(explicit, got)


def test_dynamic_batch(exported):
    key, sampler, rtc, path, _ = exported
    gen = torch.Generator().manual_seed(2)
    noise, prev = torch.randn(3, H, D, generator=gen), torch.randn(3, H, D, generator=gen)
    cond = _cond(key, 3, gen)
    other = RTCGuidance(prev, [0, 4, 11], execution_horizon=S, jacobian=rtc.mode != "tweedie")
    with torch.no_grad():
        want = sampler.sample(noise, cond, guidance=other)
    got = OnnxRuntimeSampler(path).sample(noise, cond, guidance=other)
    assert relative_error(got, want) < PARITY_TOLERANCE


def test_runner_errors_name_the_argument(exported):
    _, _, rtc, path, (noise, cond, prev) = exported
    runner = OnnxRuntimeSampler(path)
    with pytest.raises(ValueError, match="prev_chunk must be the previous chunk"):
        runner.sample(noise, cond)
    with pytest.raises(ValueError, match=r"delay must be in 0\.\.H − execution_horizon = 0\.\.11"):
        runner.sample(noise, cond, prev_chunk=prev, delay=torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="delay must be an integer tensor"):
        runner.sample(noise, cond, prev_chunk=prev, delay=torch.tensor(1.0))
    with pytest.raises(InvalidArgumentError, match="either guidance or prev_chunk"):
        runner.sample(noise, cond, guidance=rtc, prev_chunk=prev)
    other = RTCGuidance(prev, 1, execution_horizon=S + 1, jacobian=rtc.mode != "tweedie")
    with pytest.raises(InvalidArgumentError, match=r"guidance\.execution_horizon is 6"):
        runner.sample(noise, cond, guidance=other)
    flipped = RTCGuidance(prev, 1, execution_horizon=S, jacobian=rtc.mode == "tweedie")
    with pytest.raises(InvalidArgumentError, match=r"guidance\.mode is '(policy_vjp|tweedie)'"):
        runner.sample(noise, cond, guidance=flipped)
    cleared = RTCGuidance(prev, 1, execution_horizon=S, jacobian=rtc.mode != "tweedie")
    cleared.clear_prefix()
    with pytest.raises(InvalidArgumentError, match=r"call guidance\.set_prefix"):
        runner.sample(noise, cond, guidance=cleared)


def test_refused_guidance_and_models(tmp_path):
    torch.manual_seed(0)
    head = HEADS["mlp"]().eval()
    noise, prev, cond = torch.randn(1, H, D), torch.randn(1, H, D), torch.randn(1, 6)

    class OtherVJP:
        scale, clamp, mode = 1.0, float("inf"), "policy_vjp"

        def gradient(self, x, x0_hat, dx0_dx):
            return torch.zeros_like(x)

    sampler = ate_fast.FlowSampler(head, num_steps=2)
    with pytest.raises(GuidanceExportError, match=r"only ate_fast\.realtime\.RTCGuidance"):
        to_onnx(sampler, tmp_path / "g.onnx", noise, cond, OtherVJP())
    unet = make_head("unet1d", "small", horizon=H, action_dim=D, cond_dim=6).eval()
    rtc = RTCGuidance(prev, 1, execution_horizon=S)
    with pytest.raises(GuidanceExportError, match="no input-VJP of its own"):
        to_onnx(ate_fast.FlowSampler(unet, 2), tmp_path / "g.onnx", noise, cond, rtc)


@pytest.mark.cuda
def test_tensorrt_engine_feeds_prev_chunk_and_delay(exported, tmp_path):
    """Where TensorRT and a GPU exist: the RTC engine, fed the guidance's prefix or the
    explicit arguments, computes what the PyTorch sampler does."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from ate_fast.export import TensorRTSampler, to_tensorrt

    key, sampler, rtc, path, (noise, cond, prev) = exported
    engine = TensorRTSampler(to_tensorrt(path, tmp_path / "rtc.plan", "fp32", 2.0))
    sampler.model_fn.cuda()
    try:
        noise, cond, prev = noise.cuda(), cond.cuda(), prev.cuda()
        guidance = RTCGuidance(prev, [1, 9], execution_horizon=S, jacobian=rtc.mode != "tweedie")
        with torch.no_grad():
            want = sampler.sample(noise, cond, guidance=guidance)
        got = engine.sample(noise, cond, guidance=guidance)
        assert relative_error(got, want) < 1e-3, key
        explicit = engine.sample(noise, cond, prev_chunk=prev, delay=torch.tensor([1, 9]).cuda())
        assert relative_error(explicit, got) < 1e-6
    finally:
        sampler.model_fn.cpu()
