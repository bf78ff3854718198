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

pytest.importorskip("triton")
SCRIPT = Path(__file__).with_name("triton_offline_compile.py")
ROOT = SCRIPT.parent.parent


def _start(tmp_path, *args: str) -> subprocess.Popen:
    """The compile script with ``args`` in a subprocess, its Triton cache in ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return out


def test_kernels_compile_for_the_h100_and_the_orin(tmp_path):
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
    two-core CI machine; each its own Triton cache)."""
    running = {arch: _start(tmp_path / arch, arch) for arch in ("90", "87")}
    out = {arch: _finish(proc) for arch, proc in running.items()}
    assert "compiled 639 kernel variants for sm_90" in out["90"]
    assert "compiled 563 kernel variants for sm_87" in out["87"]
    assert "(shared memory within sm_87/sm_86/sm_89)" in out["87"]
