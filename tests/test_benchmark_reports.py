"""The GPU suite's reports survive what ends a rare GPU session early: a suite interrupted at
its time limit (SIGINT) inside a case still writes the JSON of the cases it finished
(benchmarks/conftest.py), and gpu_summary.py summarises a run whose ``ate-fast info`` or a
test shard's JUnit file is missing or unreadable."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

INTERRUPTED_SUITE = """
import os, signal
import pytest

@pytest.mark.parametrize("i", range(3))
def test_cuda_case(benchmark, i):
    benchmark.extra_info["impl"] = f"r{i}"

    def batch():
        if i == 1:  # the suite's limit arrives in this case's warm-up
            os.kill(os.getpid(), signal.SIGINT)

    benchmark.pedantic(batch, rounds=5, warmup_rounds=2)
"""


def _own_session_env() -> dict:
    """This environment less pytest-xdist's worker variables: under ``-n``, the child suite
    would otherwise take itself for a worker, and pytest-benchmark writes no JSON there."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_an_interrupted_suite_keeps_its_finished_cases(tmp_path, sigint):
    """SIGINT mid-suite (the suite's ``timeout -s INT``): pytest-benchmark writes what
    finished — also where the suite started with SIGINT ignored (a script's background
    job: gpu_suite.sh's test shards), which benchmarks/conftest.py undoes."""
    shutil.copy(BENCH_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_cut.py").write_text(INTERRUPTED_SUITE)
    out = tmp_path / "cut.json"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "bench_cut.py", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={out}"],
        cwd=tmp_path, env=_own_session_env(), capture_output=True, text=True, timeout=120,
        preexec_fn=_ignore_sigint if sigint == "ignored" else None,
    )  # fmt: skip
    assert run.returncode != 0  # interrupted
    cases = json.loads(out.read_text())["benchmarks"]  # no JSON at all without the hook
    assert [c["extra_info"]["impl"] for c in cases] == ["r0"]
    assert cases[0]["stats"]["rounds"] == 5


KILLED_SUITE = """
import os, signal
import pytest

@pytest.mark.parametrize("i", range(3))
def test_cuda_case(benchmark, i):
    benchmark.group = "cut"
    benchmark.extra_info.update(impl=f"r{i}", calls=2)
    if i == 2:  # killed outright (SIGKILL after the suite's grace): no writer runs
        os.kill(os.getpid(), signal.SIGKILL)
    benchmark.pedantic(lambda: None, rounds=4, warmup_rounds=1)
"""


def _run_suite(tmp_path, source: str, out: Path) -> subprocess.CompletedProcess:
    shutil.copy(BENCH_DIR / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_cut.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "bench_cut.py", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={out}"],
        cwd=tmp_path, env=_own_session_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_killed_suite_leaves_its_finished_cases_for_the_summary(tmp_path, monkeypatch):
    """SIGKILL mid-suite: no JSON from pytest-benchmark, but ``<json>.partial`` (beside the
    JSON, in another directory than pytest's) has the cases finished before it, and
    gpu_summary adopts it (and says so) as the suite's JSON."""
    out = tmp_path / "results" / "bench_cut.json"
    out.parent.mkdir()
    run = _run_suite(tmp_path, KILLED_SUITE, out)
    assert run.returncode == -9, run.stdout + run.stderr
    assert not out.exists()
    assert not (tmp_path / "bench_cut.json.partial").exists()
    partial = json.loads((out.parent / "bench_cut.json.partial").read_text())
    assert [c["extra_info"]["impl"] for c in partial["benchmarks"]] == ["r0", "r1"]
    assert partial["benchmarks"][0]["stats"]["rounds"] == 4
    monkeypatch.setattr(sys, "path", list(sys.path))  # gpu_summary adds benchmarks/
    summary = _bench_module("gpu_summary")
    out.write_text("")  # as on the H200: the file created, nothing written
    notes = summary.adopt_partials(out.parent)
    assert notes == [
        "bench_cut: killed before pytest-benchmark wrote its JSON; the 2 cases it finished are "
        "kept (its .partial file)"
    ]
    assert set(summary.rows([str(out)])["cut"]) == {"r0", "r1"}  # medians per call
    assert not (out.parent / "bench_cut.json.partial").exists()


def test_a_finished_suite_leaves_no_partial_file(tmp_path):
    out = tmp_path / "results" / "whole.json"
    out.parent.mkdir()
    run = _run_suite(tmp_path, KILLED_SUITE.replace("i == 2", "i == 99"), out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(json.loads(out.read_text())["benchmarks"]) == 3
    assert not list(tmp_path.rglob("*.partial"))


def _bench_module(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3"
failures="1" errors="0" skipped="1"><testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase></testsuite></testsuites>
"""


def test_summary_without_info_and_with_a_truncated_shard(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # gpu_summary adds benchmarks/
    summary = _bench_module("gpu_summary")
    (tmp_path / "info.json").write_text("")  # `ate-fast info` failed
    (tmp_path / "cuda_tests-0.xml").write_text(JUNIT)
    (tmp_path / "cuda_tests-1.xml").write_text(JUNIT)
    (tmp_path / "cuda_tests-2.xml").write_text(JUNIT[:60])  # killed mid-write
    (tmp_path / "realsize.json").write_text(json.dumps({"environment": {"device": "NVIDIA H200"}}))
    summary.main(tmp_path)
    results = list(tmp_path.glob("20*-nvidia-h200.json"))
    assert len(results) == 1, list(tmp_path.iterdir())
    record = json.loads(results[0].read_text())
    tests = record["cuda_tests"]
    assert (tests["tests"], tests["passed"], tests["failures"], tests["skipped"]) == (6, 2, 2, 2)
    assert tests["failed_tests"] == ["tests.test_a::test_bad"] * 2
    assert [u.split(":")[0] for u in tests["unreadable"]] == ["cuda_tests-2.xml"]
    assert "error" in record["info"]
    assert (tmp_path / "summary.md").read_text().startswith("# GPU suite")
    # a run without tests on purpose says so, not "error"
    for xml in tmp_path.glob("cuda_tests-*.xml"):
        xml.unlink()
    (tmp_path / "not_run.txt").write_text("cuda tests: not run (ATE_FAST_TESTS=none)\n")
    summary.main(tmp_path)
    record = json.loads(results[0].read_text())
    assert record["cuda_tests"] == {"not_run": "ATE_FAST_TESTS=none"}


def test_a_misnamed_suite_is_refused_before_the_build(tmp_path):
    """``ATE_FAST_SUITES`` naming no benchmark file stops the GPU suite at once (exit 2, the
    files it could have meant listed), before minutes of GPU time go into the build; a
    failing ``python`` shows that nothing else ran."""
    env = {"PATH": "/usr/bin:/bin", "ATE_FAST_SUITES": "bench_rtc bench_nope.py",
           "PYTHON": "false", "OUT": str(tmp_path / "out")}  # fmt: skip
    run = subprocess.run(
        ["bash", str(BENCH_DIR / "gpu_suite.sh")], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "ATE_FAST_SUITES: no benchmark file bench_nope.py" in run.stderr
    assert "benchmarks/bench_rtc.py" in run.stderr and "== build" not in run.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "gemm"),
        ("triton_tem_fused_mm_0", "gemm"),
        ("aten::mm", "gemm"),
        ("aten::addmm", "gemm"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256, 64>>(Params)",
            "attention",
        ),
        ("_attention_backward_kernel", "attention"),
        ("_add_norm_kernel", "triton"),
        ("triton_poi_fused_add_mul_0", "triton"),
        ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>(int)", "other"),
        ("aten::copy_", "other"),
    ],
)
def test_kernel_kind_from_the_name(name, kind):
    assert _bench_module("kernel_profile").kernel_kind(name) == kind
