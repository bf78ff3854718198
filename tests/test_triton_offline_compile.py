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


def _compile(tmp_path, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_kernels_compile_for_sm90(tmp_path):
    # 106 MLP-guidance and guided-step variants + 80 Transformer-encoder ones + 84 of the
    # flow-transformer block's epilogues (forward, with and without folded norms, and
    # input-VJP)
    assert "compiled 270 kernel variants for sm_90" in _compile(tmp_path, "90")


def test_kernels_fit_the_rtx_4090(tmp_path):
    """sm_89 has the least shared memory per block of the targets (99 KB)."""
    assert "compiled 270 kernel variants for sm_89" in _compile(tmp_path, "89")


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
