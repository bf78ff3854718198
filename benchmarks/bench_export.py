"""Exported samplers: ONNX Runtime and TensorRT vs PyTorch eager vs ate_fast's captured loop.

Run:  pytest benchmarks/bench_export.py -k cpu --benchmark-json=bench_export.json
      python benchmarks/report.py bench_export.json

One group per (device, problem) at B=1; each problem is one whole K-step sampler, exported
once with :func:`ate_fast.export.to_onnx` (the export is not timed). Rows:

- ``eager``: ``sampler.sample(...)`` (the baseline column of report.py);
- ``capture``: ``sampler.capture(...)`` (CPU: recorded fused steps; CUDA: a CUDA graph);
- ``onnxruntime`` (CPU): the exported graph in ONNX Runtime's CPU provider, default threads;
- ``tensorrt-fp32`` / ``tensorrt-fp16`` (CUDA): the graph built by
  :func:`ate_fast.export.to_tensorrt` and run by ``TensorRTSampler(cuda_graph=True)`` —
  skipped, with a note, where ``import tensorrt`` fails.

Problems: the MLP head (small config: H=50, D=32) with 10 Euler flow steps, unguided and
with ``LatentGuidance`` over the PERFORMANCE.md reference encoder (1600 → 256 → 256 →
2·64); the U-Net head (small config: H=16, D=2) with 10 DDIM steps (CPU only: the GPU
suite's time limit covers the engine builds of the MLP problems).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ate_fast.models import make_head
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule

B = 1
HAS_GPU = torch.cuda.is_available()
HAS_EXPORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

PROBLEMS = {
    "flow-euler-10 mlp-small": ("mlp", None, False),
    "flow-euler-10-latent-guided mlp-small": ("mlp", None, True),
    "ddim-10 unet1d-small": ("unet1d", (32,), False),
}
GPU_PROBLEMS = ("flow-euler-10 mlp-small", "flow-euler-10-latent-guided mlp-small")
CPU_ROWS = ("eager", "capture", "onnxruntime")
CUDA_ROWS = ("eager", "capture", "tensorrt-fp32", "tensorrt-fp16")
CASES = [("cpu", p, r) for p in PROBLEMS for r in CPU_ROWS]
if HAS_GPU:
    CASES += [("cuda", p, r) for p in GPU_PROBLEMS for r in CUDA_ROWS]

_FILES: dict = {}


def _setup(problem: str, device: str):
    """(sampler, guidance, noise, cond) for ``problem`` on ``device``, fixed seeds."""
    from ate_fast.align import ActionVAE
    from ate_fast.steer import LatentGuidance

    head_name, cond_shape, guided = PROBLEMS[problem]
    torch.manual_seed(0)
    head = make_head(head_name, "small").eval().requires_grad_(False).to(device)
    if problem.startswith("ddim"):
        sampler = DiffusionSampler(head, NoiseSchedule("squaredcos_cap_v2", 100), "ddim", 10)
    else:
        sampler = FlowSampler(head, 10)
    guidance = None
    if guided:
        torch.manual_seed(2)
        vae = ActionVAE(32, 50, latent_dim=64, arch="mlp", hidden_dims=(256, 256)).to(device)
        guidance = LatentGuidance(vae, torch.randn(64, device=device), scale=2.0, clamp=0.1)
    cfg = head.config
    noise = torch.randn(B, cfg.horizon, cfg.action_dim, device=device)
    cond = None if cond_shape is None else torch.randn(B, *cond_shape, device=device)
    return sampler, guidance, noise, cond


def _onnx_file(problem: str, directory: Path) -> Path:
    from ate_fast.export import to_onnx

    if problem not in _FILES:
        sampler, guidance, noise, cond = _setup(problem, "cpu")
        path = directory / f"{problem.replace(' ', '_')}.onnx"
        _FILES[problem] = to_onnx(sampler, path, noise, cond, guidance=guidance)
    return _FILES[problem]


def _engine(problem: str, precision: str, directory: Path) -> Path:
    from ate_fast.export import to_tensorrt

    key = (problem, precision)
    if key not in _FILES:
        onnx_path = _onnx_file(problem, directory)
        engine = onnx_path.with_name(f"{onnx_path.stem}-{precision}.plan")
        _FILES[key] = to_tensorrt(onnx_path, engine, precision, 2.0, 1, 1, 1)
    return _FILES[key]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_export")


@pytest.mark.parametrize("device,problem,row", CASES, ids=["-".join(c) for c in CASES])
def test_export_latency(benchmark, cuda_sync, export_dir, device, problem, row):
    benchmark.group = f"{device} {problem} B={B}"
    benchmark.extra_info["impl"] = row
    if row in ("onnxruntime", "tensorrt-fp32", "tensorrt-fp16") and not HAS_EXPORT:
        pytest.skip("onnx, onnxruntime and onnxscript are needed: pip install 'ate_fast[export]'")
    if row.startswith("tensorrt") and not HAS_TENSORRT:
        pytest.skip("TensorRT is not installed here: no TensorRT rows (pip install tensorrt)")
    sampler, guidance, noise, cond = _setup(problem, device)
    if row == "eager":
        fn = lambda: sampler.sample(noise, cond, guidance)  # noqa: E731
    elif row == "capture":
        replay = sampler.capture(noise, cond, guidance, check_finite=False)
        fn = lambda: replay(noise, cond)  # noqa: E731
    elif row == "onnxruntime":
        from ate_fast.export import OnnxRuntimeSampler

        runner = OnnxRuntimeSampler(_onnx_file(problem, export_dir))
        fn = lambda: runner.sample(noise, cond, guidance)  # noqa: E731
    else:
        from ate_fast.export import TensorRTSampler

        precision = row.split("-")[1]
        runner = TensorRTSampler(_engine(problem, precision, export_dir), cuda_graph=True)
        fn = lambda: runner.sample(noise, cond, guidance)  # noqa: E731

    def call():
        out = fn()
        cuda_sync()
        return out

    for _ in range(3):  # warm-up (capture records, CUDA graphs are built)
        call()
    benchmark.pedantic(call, rounds=100 if device == "cpu" else 300, warmup_rounds=5)
