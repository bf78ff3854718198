"""Every Triton kernel compiles for the H100 (sm_90) and the Jetson Orin (sm_87), on a
machine without a GPU, within the shared memory per block of each and of the RTX 30x0 /
40x0 (sm_86 / sm_89, whose code Triton generates as the Orin's); the
flow-transformer block's epilogues, the MLP-guidance kernels and the attention kernels in
every precision but float64 spill no registers.

The CPU tests run the kernels through Triton's interpreter, which skips the compiler; the
first H100 run found float64 kernels that passed every interpreted test and failed to
compile (``tl.dot``'s accumulator type). This runs the real compiler, in a subprocess
because the interpreter is chosen when triton is first imported. Its resource checks
found the Transformer encoder's attention kernels, with all of a head's queries in one
program, needing up to 448 KB of shared memory (float64, 128 tokens: no GPU launches
that) and spilling registers in every precision.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ate_fast.ops.backends import MIN_TRITON

triton = pytest.importorskip("triton", minversion=MIN_TRITON)
SCRIPT = Path(__file__).with_name("triton_offline_compile.py")
ROOT = SCRIPT.parent.parent
GPU_IMAGE_PIN = Path(__file__).with_name("gpu_image_triton.txt")
GPU_IMAGE_TRITON = ROOT / ".venv" / "gpu-image-triton"


def _start(*args: str, triton_dir: Path | None = None) -> subprocess.Popen:
    """The compile script with ``args`` in a subprocess (its own fresh Triton cache);
    ``triton_dir``: a folder whose Triton shadows the environment's."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    paths = [str(triton_dir) if triton_dir else None, str(ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    """The compile's output, after it succeeded without Triton's warning that a launch left
    FP contraction to its default (every launch passes ``COMPILE_OPTIONS``)."""
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in err, err[-4000:]
    return out


def _gpu_image_version() -> str:
    """The version ``tests/gpu_image_triton.txt`` pins (``triton==X``)."""
    pins = [line.split("#")[0].strip() for line in GPU_IMAGE_PIN.read_text().splitlines()]
    (pin,) = [p for p in pins if p.startswith("triton==")]
    return pin.removeprefix("triton==")


@pytest.fixture(scope="module")
def compiles():
    """The compiles' outputs by name, each read once when a test first asks (they run at
    once, sharing the cores with the other tests): sm_90 and sm_87 with the tests' Triton,
    and ``image``, sm_90 with the GPU machine's (tests/gpu_image_triton.txt) — that is the
    sm_90 compile itself where the tests' Triton is the pinned version, and None where
    ``.venv/gpu-image-triton`` holds no Triton."""
    running = {arch: _start(arch) for arch in ("90", "87")}
    if triton.__version__ == _gpu_image_version():
        running["image"] = running["90"]
    elif (GPU_IMAGE_TRITON / "triton").is_dir():
        running["image"] = _start("90", triton_dir=GPU_IMAGE_TRITON)
    else:
        running["image"] = None
    done: dict[int, str] = {}  # by process: "image" may be the sm_90 compile

    def output(name: str) -> str | None:
        proc = running[name]
        if proc is None:
            return None
        if id(proc) not in done:
            done[id(proc)] = _finish(proc)
        return done[id(proc)]

    return output


def test_kernels_compile_for_the_h100_and_the_orin(compiles):
    """All 639 variants for the H100 (sm_90), 563 for the Jetson Orin (sm_87): 106 MLP-guidance
    and guided-step variants + 84 Transformer-encoder ones (4 of them the candidate
    attention tiles) + 108 of the flow-transformer block's epilogues (forward, with and
    without folded norms, input-VJP, the gemm attention's softmax and its gradient) + 176 of
    the few-row GEMM (whole K, its K slices summed by the sum kernel or in-kernel, the
    weight read as stored [K, N], the activation epilogues; the sum kernel) + 60 of the
    split-key attention (one slice and several, combined in-kernel or by the combine for up
    to 2 and 32 slices; split_sdpa's log-sum-exp combine; the other tiles autotune tries) +
    the L2 prefetch + 28 of the persistent MLP (5 on a capture's lent counters); for sm_90
    also 76 launched with programmatic dependent launch (52 of the few-row GEMM, 11 of the
    epilogues, 5 of the split-key attention, 6 of the encoder, 2 of the persistent MLP),
    their PTX's order checked. The sm_87 compile also checks shared memory against the RTX
    30x0 / 40x0 limit (99 KB, the least of the targets): Triton generates the same code for
    every 8.x. The two compile at once, in two processes (half the wall time on the
    two-core CI machine; each its own Triton cache). Registers and spills are read from the
    report of the ptxas run Triton makes (its flags, as on a GPU; no second ptxas run)."""
    out = {arch: compiles(arch) for arch in ("90", "87")}
    assert "compiled 639 kernel variants for sm_90" in out["90"]
    assert "compiled 563 kernel variants for sm_87" in out["87"]
    assert "(shared memory within sm_87/sm_86/sm_89)" in out["87"]


def test_kernels_compile_with_the_gpu_machines_triton(compiles):
    """The same 639 sm_90 variants compile with the Triton of the GPU machine the suite runs
    on (``tests/gpu_image_triton.txt``; 3.6 where the tests have 3.9), with the same checks
    as above: shared memory, the PDL variants' PTX order, and no register spill but its
    version's ``KNOWN_SPILLS`` (3.6: the encoder attention's benchmark-only candidate
    forward tile (64, 64) in bf16 and fp16, 20 B each, which bench_transformer_guidance
    times against the default tile)."""
    out = compiles("image")
    if out is None:
        pytest.fail(
            f"{GPU_IMAGE_TRITON} holds no Triton: the README's test command installs it "
            f"(pip install --no-deps --target {GPU_IMAGE_TRITON.relative_to(ROOT)} "
            f"-r tests/gpu_image_triton.txt)"
        )
    assert f"compiled 639 kernel variants for sm_90 with triton {_gpu_image_version()} " in out
