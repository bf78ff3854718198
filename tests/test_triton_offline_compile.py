"""Every Triton kernel compiles for the H100 (sm_90), the Jetson Orin (sm_87) and the RTX
4090 (sm_89), on a machine without a GPU, within each one's shared memory per block; the
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


def _compile(tmp_path, *args: str) -> str:
    return _finish(_start(tmp_path, *args))


def test_kernels_compile_for_sm90_and_the_rtx_4090(tmp_path):
    """All 270 variants for the H100 (sm_90) and for the RTX 4090 (sm_89: the least shared
    memory per block of the targets, 99 KB): 106 MLP-guidance and guided-step variants + 80
    Transformer-encoder ones + 84 of the flow-transformer block's epilogues (forward, with
    and without folded norms, and input-VJP). The two compile at once, in two processes
    (half the wall time on the two-core CI machine; each its own Triton cache)."""
    running = {arch: _start(tmp_path / arch, arch) for arch in ("90", "89")}
    for arch, proc in running.items():
        assert f"compiled 270 kernel variants for sm_{arch}" in _finish(proc)


def test_transformer_kernels_compile_for_sm87(tmp_path):
    """The Transformer encoder's kernels (``ate_fast.steer.transformer_triton``) also for
    the Jetson Orin's sm_87 (an embedded target of the guidance)."""
    out = _compile(tmp_path, "87", "transformer")
    assert "compiled 80 kernel variants for sm_87" in out


def test_flow_block_kernels_compile_for_sm87(tmp_path):
    """The flow-transformer block's epilogue kernels (``ate_fast.models.block_epilogues_triton``)
    also for the Jetson Orin's sm_87, where the π0-scale expert is to run."""
    out = _compile(tmp_path, "87", "flow_block")
    assert "compiled 84 kernel variants for sm_87" in out


def test_guidance_and_step_kernels_compile_for_sm87(tmp_path):
    """The fused MLP-guidance gradient's and the guided step's kernels for the Orin too: the
    sampler's guided update and the default encoder's gradient run there as well."""
    out = _compile(tmp_path, "87", "mlp,guided_step")
    assert "compiled 106 kernel variants for sm_87" in out
