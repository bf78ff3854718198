"""The Jetson Orin projection of the real-size rows (benchmarks/jetson_projection.py) on
fixed numbers, and bench_realsize's compute floor against torch's FLOP counter on the dry
run's cut expert. Nothing is timed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


projection = _load("jetson_projection")
GPU_BW = 3.0e12  # a desktop GPU's measured copy bandwidth, bytes/s
STEP_BYTES = 0.7e9  # ≈ π0 expert's bf16 weights + the prefix cache


def _row(b: int, guidance: str, row: str, x_floor: float, flops: float | None = None) -> dict:
    floor_s = 10 * STEP_BYTES / GPU_BW
    entry = {
        "B": b, "guidance": guidance, "row": row, "median_s": x_floor * floor_s,
        "min_s": x_floor * floor_s, "floor_s": floor_s, "x_floor": x_floor,
        "floor_fraction": 1 / x_floor,
    }  # fmt: skip
    if flops is not None:
        entry.update(floor_bytes=10 * STEP_BYTES, floor_flops=flops)
    return entry


def _data(dry_run: bool = False) -> dict:
    return {
        "environment": {"device": "NVIDIA H200", "dry_run": dry_run},
        "bandwidth": {"bytes_per_s": GPU_BW},
        "rows": {
            "B=1 unguided ate_capture": _row(1, "unguided", "ate_capture", 3.0, 10 * 31.5e9),
            "B=8 unguided ate_capture": _row(8, "unguided", "ate_capture", 5.0, 10 * 252e9),
            # an older run's row: no bytes or FLOPs recorded (bytes from floor_s × bandwidth)
            "B=1 unguided eager": _row(1, "unguided", "eager", 12.0),
        },
    }


def test_projection_scales_the_measured_floor_multiple_to_the_orin_floor():
    entries = {e["key"]: e for e in projection.project(_data())}
    orin_floor = 10 * STEP_BYTES / 204.8e9  # 34.2 ms
    b1 = entries["B=1 unguided ate_capture"]
    assert b1["floor_s"] == pytest.approx(orin_floor, rel=1e-12)
    assert b1["projected_s"] == pytest.approx(3.0 * orin_floor, rel=1e-12)
    # 315 GFLOP at ≈ 42.6 TFLOP/s: 7.4 ms, under the 34 ms bandwidth floor
    assert b1["compute_floor_s"] == pytest.approx(10 * 31.5e9 / (64 * 256 * 2 * 1.3e9))
    assert not b1["compute_bound"]
    b8 = entries["B=8 unguided ate_capture"]  # 8× the FLOPs: 59 ms > 34 ms
    assert b8["compute_bound"] and b8["projected_s"] == pytest.approx(5.0 * orin_floor)
    eager = entries["B=1 unguided eager"]
    assert eager["floor_s"] == pytest.approx(orin_floor) and eager["compute_floor_s"] is None
    assert eager["projected_s"] == pytest.approx(12.0 * orin_floor)


def test_projection_with_a_measured_orin_bandwidth_is_slower_by_its_ratio():
    peak = {e["key"]: e["projected_s"] for e in projection.project(_data())}
    measured = projection.project(_data(), bandwidth=150e9)
    for e in measured:
        assert e["projected_s"] == pytest.approx(peak[e["key"]] * 204.8 / 150)


def test_markdown_labels_a_projection_and_marks_compute_bound_rows():
    text = projection.markdown(_data())
    assert "a projection, not a measurement" in text
    lines = [line for line in text.splitlines() if line.startswith("| 8 ")]
    assert len(lines) == 1 and "compute-bound: lower bound" in lines[0]
    assert "| 1 | unguided | ate_capture | 3.00 | 34.2 | 7.4 | 102.5 |" in text


def test_dry_run_or_empty_runs_project_nothing():
    assert projection.project(_data(dry_run=True)) == []
    assert "Nothing to project: a dry run" in projection.markdown(_data(dry_run=True))
    empty = {**_data(), "rows": {}}
    assert "Nothing to project: no row timed" in projection.markdown(empty)


def test_bad_bandwidth_raises_with_its_name():
    with pytest.raises(ValueError, match="bandwidth"):
        projection.project(_data(), bandwidth=0.0)


def test_cli_reads_realsize_json_and_a_suite_results_file(tmp_path, capsys):
    realsize = tmp_path / "realsize.json"
    realsize.write_text(json.dumps(_data()))
    suite = tmp_path / "2026-12-02-nvidia-h200.json"
    suite.write_text(json.dumps({"gpu": "NVIDIA H200", "realsize": _data()}))
    for path in (realsize, suite):
        assert projection.main([str(path)]) == 0
        assert "102.5" in capsys.readouterr().out
    assert projection.main([str(realsize), "--bandwidth-gbs", "102.4"]) == 0
    assert "205.1" in capsys.readouterr().out  # the B = 1 row at half the bandwidth
    no_rows = tmp_path / "other.json"
    no_rows.write_text(json.dumps({"gpu": "x", "realsize": None}))
    with pytest.raises(SystemExit, match="no real-size rows"):
        projection.main([str(no_rows)])
    with pytest.raises(SystemExit):
        projection.main([str(realsize), "--tflops", "0"])


@pytest.fixture(scope="module")
def realsize_dry_run():
    """bench_realsize imported as its dry run (the expert cut to 2 blocks, on the CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATE_FAST_REALSIZE_DRY_RUN", "1")
        mp.setattr(sys, "path", list(sys.path))  # the module adds benchmarks/
        mp.setitem(sys.modules, "bench_realsize", None)
        yield _load("bench_realsize")


@pytest.mark.parametrize("batch", [1, 2])
def test_compute_floor_counts_what_torch_counts(realsize_dry_run, batch):
    """floor_flops per step = torch's FLOP counter on one head call (attention in the math
    backend, which it counts) and on the encoders' autograd gradient: the head and the MLP
    encoder exactly; the Transformer encoder's attention is left out (≤ 10 %)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    br = realsize_dry_run
    steps = br.STEPS
    x = torch.randn(batch, br.H, br.D)
    cache = br._prefix_cache(batch)  # built once per observation, outside the call
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as head:
        br._head()(x, torch.full((batch,), 0.5), cache)
    unguided = br.floor_flops(batch, "unguided")
    assert unguided == steps * head.get_total_flops()
    for guidance, low in (("mlp-guided", 1.0), ("transformer-guided", 0.9)):
        u = x.to(br.DTYPE).requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as enc:
            br._encoder(guidance.split("-")[0]).objective(u).backward()
        counted = steps * enc.get_total_flops()
        added = br.floor_flops(batch, guidance) - unguided
        assert low * counted <= added <= counted, guidance
    # real-time chunking: the head's forward and input-VJP. torch counts more for the VJP
    # (autograd also forms the prefix keys' and values' gradients, which RTC never needs)
    x = x.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as rtc:
        v = br._head()(x, torch.full((batch,), 0.5), cache)
        v.backward(torch.ones_like(v))  # (autograd.grad: FlopCounterMode refuses it)
    rtc_flops = br.floor_flops(batch, br.RTC)
    assert rtc_flops == 2 * unguided <= steps * rtc.get_total_flops()


def test_gpu_summary_carries_the_projection(realsize_dry_run, tmp_path, monkeypatch, capsys):
    """gpu_summary.py puts realsize.md (its headings one level down, the projection with
    them) into summary.md and realsize.json (the projection's entries with it) into the
    results file."""
    br = realsize_dry_run
    data = _data()
    data["environment"].update(
        torch=torch.__version__, head="flow-transformer pi0-expert", head_parameters=314_700_000,
        H=50, D=32, steps=10, prefix_tokens=816, batches=[1, 8],
        settings={"ATE_FAST_SPLIT_KV_TILES": "block_q=16,splits=1"},
    )  # fmt: skip
    data["bandwidth"].update(copy_bytes=1 << 30, repeats=10)
    data.update(skipped=[], setup_s={}, gemm={"n": 8192, "repeats": 10, "flops_per_s": 7e14})
    for row in data["rows"].values():  # the measured GEMM rate's compute floor, where recorded
        if "floor_flops" in row:
            row["compute_floor_s"] = row["floor_flops"] / 7e14
    data["targets"] = br.targets(data)
    floor_targets = {t["B"]: t for t in data["targets"] if "floor" in t["target"]}
    # B = 8: 2.5 PFLOP at 700 TFLOP/s = 3.6 ms > the 2.3 ms weight-read floor; B = 1: 0.45 ms
    assert floor_targets[8]["compute_bound"] and not floor_targets[1]["compute_bound"]
    data["jetson_projection"] = projection.project(data)
    (tmp_path / "realsize.json").write_text(json.dumps(data))
    (tmp_path / "realsize.md").write_text(br.markdown(data))
    (tmp_path / "info.json").write_text(json.dumps({"gpus": [{"name": "NVIDIA H200"}]}))
    monkeypatch.setitem(sys.modules, "gpu_summary", None)
    summary = _load("gpu_summary")
    summary.main(tmp_path)
    capsys.readouterr()
    text = (tmp_path / "summary.md").read_text()
    assert "\n## Real size: π0 expert bf16" in text
    assert "\n### Jetson AGX Orin 64GB: projected from this run" in text
    assert "| 1 | unguided | ate_capture | 3.00 | 34.2 | 7.4 | 102.5 |" in text
    assert "bf16 GEMM 700 TFLOP/s" in text
    assert "Settings: `ATE_FAST_SPLIT_KV_TILES=block_q=16,splits=1`" in text
    (b8_target,) = [line for line in text.splitlines() if line.startswith("- B=8 ")]
    assert "(compute-bound" in b8_target
    (results,) = tmp_path.glob("20*-nvidia-h200.json")
    projected = json.loads(results.read_text())["realsize"]["jetson_projection"]
    assert {e["key"] for e in projected} == set(data["rows"])
