"""Import, build and environment report."""

from __future__ import annotations

import json
import subprocess
import sys

from ate_fast import native
from ate_fast.cli import main
from ate_fast.models import gemm_attention
from ate_fast.ops import backends, weight_packs
from ate_fast.system_info import format_info, info


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout


def test_import_is_lazy():
    """`import ate_fast` loads no native module and no triton."""
    loaded = json.loads(
        _python(
            "import sys, json, ate_fast; print(json.dumps(sorted(m for m in sys.modules "
            "if m.startswith(('ate_fast._C', 'triton')))))"
        )
    )
    assert loaded == []


def test_cpu_module_is_built_and_loads():
    assert native.load("_C") is not None, native.reason("_C")
    assert native.load("_C").openmp


def test_cuda_module_imports_without_a_driver_when_built():
    """Static cudart: where the build had nvcc, _C_cuda imports even on a GPU-less machine."""
    built = native.build_info().get("cuda_built")
    assert built is not None, "setup.py did not record the build (ate_fast/_build_info.json)"
    if built:
        module = native.load("_C_cuda")
        assert module is not None, native.reason("_C_cuda")
        assert "90" in module.archs and "87" in module.archs
        report = info()["native"]["_C_cuda"]
        assert report["built"] and report["cudart"] >= 12000
    else:
        assert "CUDA module not built" in native.reason("_C_cuda")


def test_info_lists_backends_with_reasons():
    data = info()
    assert data["backends"]["cpu"]["cpu"]["available"]
    assert data["backends"]["ref"]["cpu"]["available"]
    for backend, per_device in data["backends"].items():
        for device_type, entry in per_device.items():
            assert entry["available"] or entry["reason"] not in ("", "ok"), (backend, device_type)
    text = format_info(data)
    assert "torch" in text and "_C (CPU)     built" in text


def test_info_reports_the_transformer_guidance_path(monkeypatch):
    monkeypatch.delenv("ATE_FAST_TRANSFORMER_GUIDANCE", raising=False)
    # a batch of one on CUDA: the Triton kernels, where Triton runs there
    monkeypatch.setattr(backends, "availability", lambda *_: (False, "no Triton"))
    assert info()["transformer_guidance"] == {"cpu": "vjp", "cuda": "vjp"}
    monkeypatch.setattr(backends, "availability", lambda *_: (True, ""))
    paths = info()["transformer_guidance"]
    assert paths == {
        "cpu": "vjp", "cuda": "vjp", "cuda B=1": "triton", "cuda bf16/fp16 B<=8": "triton"
    }  # fmt: skip
    text = format_info(info())
    assert "cpu vjp, cuda vjp, cuda B=1 triton, cuda bf16/fp16 B<=8 triton (" in text
    monkeypatch.undo()
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "autograd")
    assert "cpu autograd, cuda autograd" in format_info(info())
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", "bogus")
    assert info()["transformer_guidance"]["cpu"].startswith("error: ATE_FAST_TRANSFORMER")
    monkeypatch.setenv("ATE_FAST_TRANSFORMER_GUIDANCE", " VJP ")  # any case, as the others
    assert info()["transformer_guidance"] == {"cpu": "vjp", "cuda": "vjp"}


def test_info_reports_a_bad_forced_backend_and_the_rest(monkeypatch, capsys):
    """A misspelt ATE_FAST_BACKEND is reported in the report, not instead of it."""
    monkeypatch.setenv("ATE_FAST_BACKEND", "bogus")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ATE_FAST_BACKEND error: ATE_FAST_BACKEND must be one of" in out
    assert "torch" in out and "flow-transformer block epilogues" in out


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["versions"]["ate_fast"]


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "ate_fast.cli", "info"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert "backend" in out and "cpu" in out


def test_public_api_resolves():
    import ate_fast

    for name in ate_fast.__all__:
        assert getattr(ate_fast, name) is not None, name
    assert ate_fast.FlowSampler is __import__("ate_fast.sampling").sampling.FlowSampler


def test_info_reports_the_cpu_gemm(monkeypatch):
    monkeypatch.setenv("ATE_FAST_CPU_GEMM", "aten")
    assert info()["cpu_gemm"].startswith("aten (")
    monkeypatch.setenv("ATE_FAST_CPU_GEMM", "onednn")
    assert "CPU float32 GEMMs (heads, encoder VJP): onednn (" in format_info(info())
    monkeypatch.setenv("ATE_FAST_CPU_GEMM", "mkl")
    assert info()["cpu_gemm"].startswith("error: ATE_FAST_CPU_GEMM: expected one of")


def test_info_reports_the_cpu_weight_packs(monkeypatch):
    monkeypatch.delenv("ATE_FAST_CPU_WEIGHT_PACKS", raising=False)
    ok, why = weight_packs.packing_available()
    assert info()["cpu_weight_packs"] == ("on" if ok else f"unavailable: {why}")
    monkeypatch.setenv("ATE_FAST_CPU_WEIGHT_PACKS", "off")
    assert "oneDNN weights packed once: " + ("off" if ok else "unavailable") in format_info(info())
    monkeypatch.setenv("ATE_FAST_CPU_WEIGHT_PACKS", "always")
    assert info()["cpu_weight_packs"].startswith("error: ATE_FAST_CPU_WEIGHT_PACKS: expected")


def test_info_reports_the_skinny_gemm_path(monkeypatch):
    monkeypatch.delenv("ATE_FAST_SKINNY_GEMM", raising=False)
    monkeypatch.delenv("ATE_FAST_SKINNY_GEMM_BLOCK_N", raising=False)
    assert info()["skinny_gemm"] == "torch"  # never the default before a GPU measured it
    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM", "triton")
    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM_BLOCK_N", "64")
    monkeypatch.delenv("ATE_FAST_SKINNY_GEMM_SPLIT_K", raising=False)
    expected = "block GEMMs at <= 64 rows: triton (BLOCK_N 64, split K auto)"
    assert expected in format_info(info())
    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM_SPLIT_K", "4")
    assert info()["skinny_gemm"] == "triton (BLOCK_N 64, split K 4)"
    monkeypatch.setenv("ATE_FAST_SKINNY_GEMM_BLOCK_N", "48")
    assert info()["skinny_gemm"].startswith("error: ATE_FAST_SKINNY_GEMM_BLOCK_N")


def test_info_reports_where_split_work_is_reduced(monkeypatch):
    monkeypatch.delenv("ATE_FAST_SPLIT_REDUCE", raising=False)
    expected = (
        "split GEMM / attention slices reduced, persistent MLP counters zeroed: in-kernel when"
        " captured"
    )
    assert expected in format_info(info())
    monkeypatch.setenv("ATE_FAST_SPLIT_REDUCE", "kernel")
    assert info()["split_reduce"] == "second kernel"
    monkeypatch.setenv("ATE_FAST_SPLIT_REDUCE", "atomic")
    assert info()["split_reduce"].startswith("error: ATE_FAST_SPLIT_REDUCE: expected one of")


def test_info_reports_the_triton_launch(monkeypatch):
    monkeypatch.delenv("ATE_FAST_TRITON_PDL", raising=False)
    assert "Triton kernels with programmatic dependent launch: off" in format_info(info())
    monkeypatch.setenv("ATE_FAST_TRITON_PDL", "on")
    assert info()["triton_pdl"] == "on"
    monkeypatch.setenv("ATE_FAST_TRITON_PDL", "yes")
    assert info()["triton_pdl"].startswith("error: ATE_FAST_TRITON_PDL: expected one of")


def test_info_reports_the_prefix_attention_path(monkeypatch):
    monkeypatch.delenv("ATE_FAST_PREFIX_ATTENTION", raising=False)
    monkeypatch.setenv("ATE_FAST_SPLIT_KV_TILES", "splits=4")  # read only for split_kv
    assert info()["prefix_attention"] == "sdpa"  # the default until a GPU measures otherwise
    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", "split_kv")
    monkeypatch.setenv("ATE_FAST_SPLIT_KV_TILES", "block_q=16, splits=4")
    text = format_info(info())
    assert "attention against the prefix: split_kv (block_q=16, splits=4)" in text
    monkeypatch.setenv("ATE_FAST_SPLIT_KV_TILES", "block_q=16,ways=4")
    assert info()["prefix_attention"].startswith("error: ATE_FAST_SPLIT_KV_TILES: expected")
    monkeypatch.setenv("ATE_FAST_SPLIT_KV_TILES", "block_q=24")  # a value the kernels refuse
    assert info()["prefix_attention"] == (
        "error: ATE_FAST_SPLIT_KV_TILES: Tiles.block_q: expected a power of two >= 16, got 24"
    )
    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", "split_sdpa")
    monkeypatch.setenv("ATE_FAST_SPLIT_SDPA_CHUNKS", "12")
    assert info()["prefix_attention"] == "split_sdpa (12 key slices)"
    monkeypatch.setenv("ATE_FAST_SPLIT_SDPA_CHUNKS", "1")
    assert info()["prefix_attention"].startswith("error: ATE_FAST_SPLIT_SDPA_CHUNKS: expected")
    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", "gemm")
    with_dtype = "gemm (bf16/fp16 scores written in float32 by cuBLAS)"
    assert info()["prefix_attention"] == with_dtype  # this torch has bmm(..., out_dtype=)
    monkeypatch.setattr(gemm_attention, "float32_output_gemm", lambda: False)
    assert info()["prefix_attention"].startswith("gemm (bf16/fp16 q and k upcast first")
    monkeypatch.setenv("ATE_FAST_PREFIX_ATTENTION", "flash")
    assert info()["prefix_attention"].startswith("error: ATE_FAST_PREFIX_ATTENTION: expected")


def test_info_reports_the_guidance_stream(monkeypatch):
    monkeypatch.delenv("ATE_FAST_GUIDANCE_STREAM", raising=False)
    assert info()["guidance_stream"] == "same"  # the default until a GPU measures the side
    monkeypatch.setenv("ATE_FAST_GUIDANCE_STREAM", "side")
    assert "latent guidance (mode direct) on CUDA: side stream" in format_info(info())
    monkeypatch.setenv("ATE_FAST_GUIDANCE_STREAM", "both")
    assert info()["guidance_stream"].startswith("error: ATE_FAST_GUIDANCE_STREAM: expected")


def test_info_reports_the_l2_prefetch(monkeypatch):
    monkeypatch.delenv("ATE_FAST_L2_PREFETCH", raising=False)
    assert info()["l2_prefetch"] == "off"  # the default until a GPU measures it
    monkeypatch.setenv("ATE_FAST_L2_PREFETCH", "mlp")
    assert "MLP weights into L2 during attention: mlp" in format_info(info())
    monkeypatch.setenv("ATE_FAST_L2_PREFETCH", "yes")
    assert info()["l2_prefetch"].startswith("error: ATE_FAST_L2_PREFETCH: expected")


def test_info_reports_the_mlp_guidance_unroll(monkeypatch):
    monkeypatch.delenv("ATE_FAST_MLP_GUIDANCE_UNROLL", raising=False)
    assert info()["mlp_guidance_unroll"] == 4  # the kernel measured, until 16 is
    monkeypatch.setenv("ATE_FAST_MLP_GUIDANCE_UNROLL", "16")
    assert "MLP-guidance CUDA kernel's loop unroll: 16" in format_info(info())
    monkeypatch.setenv("ATE_FAST_MLP_GUIDANCE_UNROLL", "32")
    assert info()["mlp_guidance_unroll"].startswith("error: ATE_FAST_MLP_GUIDANCE_UNROLL: expected")


def test_info_reports_the_flow_epilogues_path(monkeypatch):
    monkeypatch.delenv("ATE_FAST_FLOW_EPILOGUES", raising=False)
    # CUDA's default is triton where Triton runs on CUDA: not on this machine
    cuda_default = "triton" if backends.availability("triton", "cuda")[0] else "torch"
    # the CPU's default: the native gated-GELU kernels where ate_fast._C loads
    cpu_default = "native" if native.load("_C") is not None else "torch"
    assert info()["flow_epilogues"] == {"cpu": cpu_default, "cuda": cuda_default}
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", "triton")
    assert "flow-transformer block epilogues: cpu triton, cuda triton" in format_info(info())
    monkeypatch.setenv("ATE_FAST_FLOW_EPILOGUES", "bogus")
    assert info()["flow_epilogues"]["cuda"].startswith("error: ATE_FAST_FLOW_EPILOGUES")
