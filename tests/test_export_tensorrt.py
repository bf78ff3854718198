"""TensorRT: engine build decisions for TensorRT 10 and 11, the ONNX precision casts, the
runner — and, where TensorRT and a GPU exist, real engines against PyTorch.

Without TensorRT (CI, this project's CPU machines) the tests run everything that does not
execute TensorRT itself: version detection, the build plan per version, the clear error
when ``tensorrt`` is missing, the fp16/bf16 casting of the ONNX graph (checked by
``onnx.checker``, the TensorRT operator table and, for fp16, ONNX Runtime), and
``to_tensorrt``'s calls into the TensorRT API through a recording stand-in module — which
shows which flags and shapes each API generation gets, not that TensorRT accepts them.
The tests that build and run engines are marked ``cuda`` and skip only where
``import tensorrt`` fails (or no GPU is present).
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from test_export_cases import ALL_CASES, example_inputs, exported

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto  # noqa: E402

from ate_fast.cli import main  # noqa: E402
from ate_fast.export import (  # noqa: E402
    TensorRTBuildError,
    TensorRTUnavailableError,
    cast_for_precision,
    relative_error,
    tensorrt_problems,
    to_tensorrt,
)
from ate_fast.export.precision import float32_to_bfloat16_bits  # noqa: E402
from ate_fast.export.signature import signature_from_io  # noqa: E402
from ate_fast.export.tensorrt_build import (  # noqa: E402
    batch_profile,
    build_plan,
    import_tensorrt,
    parse_version,
    sidecar_path,
)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


# -- versions and build plans ---------------------------------------------------------
def test_parse_version():
    assert parse_version("10.3.0.30") == (10, 3, 0)
    assert parse_version("11.4.1") == (11, 4, 1)
    assert parse_version("10.13") == (10, 13, 0)
    with pytest.raises(ValueError, match="cannot read a TensorRT version"):
        parse_version("dev")


def test_build_plan_per_tensorrt_generation():
    # TensorRT 10: weak typing, precision by builder flags; fp32 clears TF32
    plan = build_plan((10, 3, 0), "fp16")
    assert (plan.strongly_typed, plan.builder_flags, plan.cast_precision) == (
        False,
        ("FP16",),
        None,
    )
    assert build_plan((10, 3, 0), "bf16").builder_flags == ("BF16",)
    fp32 = build_plan((10, 3, 0), "fp32")
    assert fp32.builder_flags == () and fp32.cleared_flags == ("TF32",)
    # TensorRT 10, opting in to strong typing; TensorRT 11: always strongly typed, cast graph
    assert build_plan((10, 8, 0), "fp16", strongly_typed=True).cast_precision == "fp16"
    for version in ((11, 0, 0), (11, 4, 1), (12, 0, 0)):
        plan = build_plan(version, "bf16")
        assert (plan.strongly_typed, plan.builder_flags, plan.cast_precision) == (True, (), "bf16")
    assert build_plan((11, 4, 1), "fp32").cast_precision is None
    with pytest.raises(ValueError, match="strongly typed networks only"):
        build_plan((11, 4, 1), "fp16", strongly_typed=False)
    with pytest.raises(TensorRTBuildError, match="needs TensorRT >= 10"):
        build_plan((8, 6, 1), "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_plan((10, 3, 0), "int8")


def test_batch_profile():
    assert batch_profile((-1, 50, 32), 1, 2, 8, "noise") == ((1, 50, 32), (2, 50, 32), (8, 50, 32))
    assert batch_profile((3, -1, 50, 32), 1, 1, 4, "step_noise")[2] == (3, 4, 50, 32)
    assert batch_profile((2, 50, 32), 1, 1, 8, "noise") is None
    with pytest.raises(TensorRTBuildError, match="several dynamic dims"):
        batch_profile((-1, -1, 32), 1, 1, 8, "noise")


def test_missing_tensorrt_is_a_clear_error(monkeypatch, tmp_path, export_dir):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(TensorRTUnavailableError, match="pip install tensorrt"):
        import_tensorrt()
    path = exported("euler", export_dir)[0]
    with pytest.raises(TensorRTUnavailableError, match=r"ONNX export .* do not need it"):
        to_tensorrt(path, tmp_path / "e.plan")
    from ate_fast.export import TensorRTSampler

    (tmp_path / "e.plan").write_bytes(b"x")
    with pytest.raises(TensorRTUnavailableError):
        TensorRTSampler(tmp_path / "e.plan")


def test_build_argument_errors(tmp_path, export_dir):
    path = exported("euler", export_dir)[0]
    with pytest.raises(FileNotFoundError, match="onnx_path: no ONNX file"):
        to_tensorrt(tmp_path / "missing.onnx", tmp_path / "e.plan")
    with pytest.raises(ValueError, match="precision must be one of"):
        to_tensorrt(path, tmp_path / "e.plan", precision="int8")
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        to_tensorrt(path, tmp_path / "e.plan", min_batch=4, max_batch=2)
    with pytest.raises(ValueError, match="workspace_gb must be > 0"):
        to_tensorrt(path, tmp_path / "e.plan", workspace_gb=0)


# -- the ONNX casts for strongly typed networks ---------------------------------------
def _types(model) -> dict:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {i.name: i.type.tensor_type.elem_type for i in (*g.input, *g.value_info, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_for_precision(precision, export_dir):
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    for name in ("unet1d-ddim", "euler-guided"):
        model = onnx.load(str(exported(name, export_dir)[0]))
        cast = cast_for_precision(model, precision)
        onnx.checker.check_model(cast, full_check=True)
        assert tensorrt_problems(cast) == []
        types = _types(cast)
        heavy = {"MatMul", "Gemm"} | ({"Conv", "ConvTranspose"} if precision == "fp16" else set())
        seen = set()
        for node in cast.graph.node:
            if node.op_type in heavy:
                assert all(types[i] == low for i in node.input if i), node.name
                seen.add(node.op_type)
            elif node.op_type in ("Conv", "ConvTranspose"):  # bf16 Conv needs opset 22
                assert all(types[i] == TensorProto.FLOAT for i in node.input if i)
        if name == "unet1d-ddim":  # Linear layers (Gemm), Conv1d, ConvTranspose1d
            assert seen == ({"Gemm", "Conv", "ConvTranspose"} if precision == "fp16" else {"Gemm"})
        else:  # MLP head and encoder VJP: Linear on [B, H, D] (MatMul) and [B, F] (Gemm)
            assert seen == {"MatMul", "Gemm"}
        for io in (*cast.graph.input, *cast.graph.output):
            assert io.type.tensor_type.elem_type == TensorProto.FLOAT
        props = {p.key: p.value for p in cast.metadata_props}
        assert props["ate_fast.precision"] == precision and "ate_fast" in props
        if name == "euler-guided" or precision == "fp16":  # weights stored in the low type
            sizes = sum(len(i.raw_data) for i in cast.graph.initializer)
            assert sizes < 0.6 * sum(len(i.raw_data) for i in model.graph.initializer)
    same = cast_for_precision(model, "fp32")
    assert same.SerializeToString() == model.SerializeToString()
    with pytest.raises(ValueError, match="precision must be one of"):
        cast_for_precision(model, "fp8")


def test_fp16_cast_graph_runs_close_to_fp32(export_dir):
    path, _, _ = exported("unet1d-ddim", export_dir)
    model = onnx.load(str(path))
    noise, cond = example_inputs(ALL_CASES["unet1d-ddim"], 4)
    feeds = {"noise": noise.numpy(), "cond": cond.numpy()}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    full = ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)[0]
    half = cast_for_precision(model, "fp16").SerializeToString()
    low = ort.InferenceSession(half, options).run(None, feeds)[0]
    err = relative_error(torch.from_numpy(low), torch.from_numpy(full))
    assert 1e-6 < err < 1e-2  # fp16 matmuls/convolutions really ran, and stay close


def test_bfloat16_bits_round_to_nearest_even():
    values = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    values[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, float("inf")])
    bits = float32_to_bfloat16_bits(values.numpy())
    expected = values.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
    assert (bits == expected).all()


# -- to_tensorrt through a recording stand-in for the tensorrt module ------------------
def _fake_tensorrt(version: str, parse_ok: bool = True, build_ok: bool = True):
    """A module with the TensorRT API surface to_tensorrt uses; records every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"flags_set": [], "flags_cleared": [], "profile": {}}
    trt.calls = calls

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, severity):
            calls["log_severity"] = severity

    class Input:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network = network

        def _read(self, model):
            calls["parsed_model"] = model
            for i in model.graph.input:
                dims = i.type.tensor_type.shape.dim
                shape = tuple(-1 if d.dim_param else d.dim_value for d in dims)
                self.network.inputs.append(Input(i.name, shape))
            return parse_ok

        def parse_from_file(self, path):
            calls["parsed_from"] = ("file", path)
            return self._read(onnx.load(path))

        def parse(self, data, path=None):
            calls["parsed_from"] = ("bytes", path)
            return self._read(onnx.load_from_string(data))

        def get_error(self, i):
            return "In node 3 (Foo): UNSUPPORTED_NODE"

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls["profile"][name] = (low, opt, high)

    class Config:
        builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def set_flag(self, flag):
            calls["flags_set"].append(flag)

        def clear_flag(self, flag):
            calls["flags_cleared"].append(flag)

        def add_optimization_profile(self, profile):
            calls["profiles_added"] = calls.get("profiles_added", 0) + 1

        def create_timing_cache(self, data):
            calls["timing_cache_read"] = bytes(data)
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["timing_cache_ignore_mismatch"] = ignore_mismatch
            return not cache.data.startswith(b"OTHER-GPU")  # TensorRT's header check

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):  # what was read plus this build's timings
            return memoryview(self.data + b"+timings")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE" if build_ok else None

    flags = {"TF32": "TF32"}
    if int(version.split(".")[0]) < 11:  # TensorRT 11 removed the precision flags
        flags.update(FP16="FP16", BF16="BF16")
    trt.BuilderFlag = types.SimpleNamespace(**flags)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


def test_to_tensorrt_10_uses_builder_flags(monkeypatch, tmp_path, export_dir):
    trt = _fake_tensorrt("10.3.0.30")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = exported("ddpm", export_dir)[0]
    engine = to_tensorrt(path, tmp_path / "p.plan", "fp16", 2.0, 1, 2, 8)
    calls = trt.calls
    assert engine.read_bytes() == b"ENGINE"
    assert calls["network_flags"] == 0 and calls["flags_set"] == ["FP16"]
    assert calls["parsed_from"] == ("file", str(path))  # the float32 graph, unchanged
    assert calls["pool"] == ("workspace", 2 << 30)
    assert calls["profile"]["noise"] == ((1, 50, 32), (2, 50, 32), (8, 50, 32))
    assert calls["profile"]["step_noise"] == ((3, 1, 50, 32), (3, 2, 50, 32), (3, 8, 50, 32))
    assert calls["profiles_added"] == 1
    record = json.loads(sidecar_path(engine).read_text())
    assert record["precision"] == "fp16" and record["plan"]["strongly_typed"] is False
    assert record["signature"]["step_noise_draws"] == 3 and record["batch_profile"] == [1, 2, 8]
    to_tensorrt(path, tmp_path / "p32.plan", "fp32")
    assert trt.calls["flags_cleared"] == ["TF32"]


def test_timing_cache_is_read_and_written_back(monkeypatch, tmp_path, export_dir):
    """A missing cache file starts an empty cache; after the build the cache (with the
    build's timings) is written to the file, which the next build reads; a cache TensorRT
    refuses is a build error naming the file, and no engine is written."""
    path = exported("euler", export_dir)[0]  # exported before the stand-in is installed
    trt = _fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache = tmp_path / "timing.cache"
    to_tensorrt(path, tmp_path / "a.plan", timing_cache=cache)
    assert trt.calls["timing_cache_read"] == b"" and cache.read_bytes() == b"+timings"
    assert trt.calls["timing_cache_ignore_mismatch"] is False
    engine = to_tensorrt(path, tmp_path / "b.plan", timing_cache=str(cache))
    assert trt.calls["timing_cache_read"] == b"+timings"
    assert cache.read_bytes() == b"+timings+timings"
    assert json.loads(sidecar_path(engine).read_text())["timing_cache"] == str(cache)
    cache.write_bytes(b"OTHER-GPU")
    with pytest.raises(TensorRTBuildError, match=f"timing_cache: TensorRT refused {cache}"):
        to_tensorrt(path, tmp_path / "c.plan", timing_cache=cache)
    assert not (tmp_path / "c.plan").exists() and cache.read_bytes() == b"OTHER-GPU"
    with pytest.raises(ValueError, match="is a directory"):
        to_tensorrt(path, tmp_path / "d.plan", timing_cache=tmp_path)
    # the command line: --timing-cache, and its errors named by the flag
    cache.unlink()
    argv = ["export", "tensorrt", str(path), "--out", str(tmp_path / "e.plan")]
    assert main([*argv, "--timing-cache", str(cache)]) == 0
    assert cache.read_bytes() == b"+timings"
    argv[-1] = str(tmp_path / "f.plan")
    assert main([*argv, "--timing-cache", str(tmp_path)]) == 2


def test_to_tensorrt_11_is_strongly_typed_on_a_cast_graph(monkeypatch, tmp_path, export_dir):
    trt = _fake_tensorrt("11.4.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    path = exported("unet1d-ddim", export_dir)[0]
    engine = to_tensorrt(path, tmp_path / "p.plan", "bf16")
    calls = trt.calls
    assert calls["network_flags"] == 1 << 3 and calls["flags_set"] == []
    assert calls["parsed_from"] == ("bytes", str(path))
    parsed = calls["parsed_model"]
    assert {p.key: p.value for p in parsed.metadata_props}["ate_fast.precision"] == "bf16"
    assert any(i.data_type == TensorProto.BFLOAT16 for i in parsed.graph.initializer)
    assert calls["profile"]["cond"] == ((1, 32), (1, 32), (8, 32))
    assert json.loads(sidecar_path(engine).read_text())["plan"]["cast_precision"] == "bf16"


def test_to_tensorrt_10_strongly_typed_opt_in(monkeypatch, tmp_path, export_dir):
    trt = _fake_tensorrt("10.8.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    to_tensorrt(exported("euler", export_dir)[0], tmp_path / "p.plan", strongly_typed=True)
    assert trt.calls["network_flags"] == 1 << 3 and trt.calls["flags_set"] == []
    types = _types(trt.calls["parsed_model"])
    matmuls = [n for n in trt.calls["parsed_model"].graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.input[0]] == TensorProto.FLOAT16 for n in matmuls)


def test_to_tensorrt_failures_are_reported(monkeypatch, tmp_path, export_dir):
    path = exported("euler", export_dir)[0]
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0", parse_ok=False))
    with pytest.raises(TensorRTBuildError, match="UNSUPPORTED_NODE"):
        to_tensorrt(path, tmp_path / "p.plan")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0", build_ok=False))
    with pytest.raises(TensorRTBuildError, match="rerun with verbose=True"):
        to_tensorrt(path, tmp_path / "p.plan")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1"))
    with pytest.raises(TensorRTBuildError, match="too old"):
        to_tensorrt(path, tmp_path / "p.plan")
    assert not (tmp_path / "p.plan").exists()


def test_runner_needs_cuda(monkeypatch, tmp_path):
    from ate_fast.export import TensorRTSampler

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "e.plan").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TensorRTSampler(tmp_path / "e.plan")


def test_signature_from_engine_io():
    sig = signature_from_io(
        {"noise": (-1, 16, 2), "cond": (-1, 32), "target": (-1, 8), "step_noise": (3, -1, 16, 2)}
    )
    assert sig.input_names == ["noise", "cond", "target", "step_noise"]
    assert (sig.horizon, sig.action_dim, sig.target_dim, sig.step_noise_draws) == (16, 2, 8, 3)
    assert sig.dynamic_batch and sig.cond_shapes == [[32]] and not sig.guidance_known
    keyed = signature_from_io({"noise": (2, 4, 3), "cond.obs": (2, 5), "cond.img": (2, 7)})
    assert keyed.cond_kind == "dict" and keyed.cond_keys == ["obs", "img"] and keyed.batch == 2
    with pytest.raises(ValueError, match="no 'noise' input"):
        signature_from_io({"x": (1, 2)})
    # a PrefixCache's inputs (a VLM's KV cache, its padding mask), in any engine order
    kv = (-1, 1, 12, 64)
    io = {"cond.mask": (-1, 12), "noise": (-1, 16, 2), "cond.values.1": kv, "cond.keys.1": kv,
          "cond.values.0": kv, "cond.keys.0": kv}  # fmt: skip
    cache = signature_from_io(io)
    assert cache.cond_kind == "prefix_cache"
    assert cache.cond_keys == ["keys.0", "keys.1", "values.0", "values.1", "mask"]
    assert cache.cond_shapes == [[1, 12, 64]] * 4 + [[12]]
    del io["cond.mask"], io["cond.values.1"]  # no mask; keys without values: not a cache
    assert signature_from_io({**io, "cond.values.1": kv}).cond_keys[-1] == "values.1"
    assert signature_from_io(io).cond_kind == "dict"


# -- real engines (run where TensorRT and a GPU exist) ---------------------------------
def _cuda_case(name: str):
    """A fresh sampler (and guidance) of case ``name`` on the GPU."""
    sampler, guidance = ALL_CASES[name].build()
    sampler.model_fn.cuda()
    if guidance is not None:
        guidance.encoder.source.cuda()  # the mask and target follow the data's device
    return sampler, guidance


@pytest.mark.cuda
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_engine_matches_pytorch(precision, tolerance, tmp_path, export_dir):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from ate_fast.export import TensorRTSampler

    name = "euler-guided"
    engine = to_tensorrt(exported(name, export_dir)[0], tmp_path / "e.plan", precision, 2.0)
    sampler, guidance = _cuda_case(name)
    runner = TensorRTSampler(engine)
    graphed = TensorRTSampler(engine, cuda_graph=True)
    for batch in (1, 8):
        noise, cond = (t.cuda() for t in example_inputs(ALL_CASES[name], batch, seed=batch))
        ref = sampler.sample(noise, cond, guidance)
        out = runner.sample(noise, cond, guidance)
        assert out.is_cuda and out.shape == ref.shape
        assert relative_error(out, ref) < tolerance
        first = graphed.sample(noise, cond, guidance).clone()
        assert relative_error(first, out) < 1e-6
        unchecked = TensorRTSampler(engine, check_finite=False)  # no NaN/inf host syncs
        assert torch.equal(unchecked.sample(noise, cond, guidance), out)
        again = graphed.sample(noise.flip(0), cond.flip(0), guidance)  # replayed, new inputs
        assert relative_error(again, runner.sample(noise.flip(0), cond.flip(0), guidance)) < 1e-6
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner.sample(*(t.cuda() for t in example_inputs(ALL_CASES[name], 9)), guidance)


@pytest.mark.cuda
def test_tensorrt_stochastic_sampler_draws_like_pytorch(tmp_path, export_dir):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from ate_fast.export import TensorRTSampler

    name = "ddpm"
    engine = to_tensorrt(exported(name, export_dir)[0], tmp_path / "d.plan", "fp32")
    sampler, _ = _cuda_case(name)
    noise, cond = (t.cuda() for t in example_inputs(ALL_CASES[name], 4))
    ref = sampler.sample(noise, cond, generator=torch.Generator().manual_seed(3))
    out = TensorRTSampler(engine).sample(noise, cond, generator=torch.Generator().manual_seed(3))
    assert relative_error(out, ref) < 1e-3
