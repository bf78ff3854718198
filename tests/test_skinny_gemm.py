"""The few-row GEMM kernel (``ate_fast.models.skinny_gemm``): against float64 on random
inputs in every storage dtype and column tile, on the CPU through the Triton interpreter
(and on a GPU where there is one); inside the flow-transformer head and its captured
sampler; and where torch's GEMM must run instead."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import (  # tests/ is on sys.path
    assert_compile_traces_torch_ops,
    assert_path_matches,
    small_head,
)

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import skinny_gemm

pytest.importorskip("triton")

F64 = torch.float64
# the relative error bound of one rounding to the dtype (bfloat16 in the interpreter: a
# whole ulp, it truncates) and of a float32 sum of K products, as a multiple of √K·u
UNIT = {F64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture
def triton_path(monkeypatch):
    monkeypatch.setenv(skinny_gemm.ENV_VAR, "triton")
    return monkeypatch


def _operands(rows, k, n, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + rows + k + n)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(device, dtype)

    return rand(rows, k), rand(n, k, scale=k**-0.5), rand(n), rand(rows, n)


def _check(got, x, w, b, r, dtype):
    """``got`` within a few roundings of the float64 product of the operands it was given
    (so only the kernel's own error counts): the output's rounding plus the accumulator's
    (float64 / float32) over K terms, relative to the terms' magnitudes."""
    x64, w64 = x.to(F64), w.to(F64)
    ref = x64 @ w64.T
    scale = x64.abs() @ w64.abs().T
    if b is not None:
        ref, scale = ref + b.to(F64), scale + b.to(F64).abs()
    if r is not None:
        ref, scale = ref + r.to(F64), scale + r.to(F64).abs()
    acc = UNIT[F64] if dtype == F64 else UNIT[torch.float32]
    bound = UNIT[dtype] * ref.abs() + 4 * acc * x.shape[-1] ** 0.5 * scale + 1e-300
    err = (got.to(F64) - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n", skinny_gemm.BLOCK_NS)
@pytest.mark.parametrize(("rows", "k", "n"), [(50, 256, 96), (1, 200, 40), (64, 96, 130)])
def test_kernel_matches_float64(triton_path, dtype, block_n, rows, k, n):
    """Uneven K (200, 96 in bf16's 128-wide steps) and N (40, 130), one row and a full
    row tile; with bias and residual, and without."""
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, str(block_n))
    x, w, b, r = _operands(rows, k, n, dtype)
    _check(skinny_gemm.skinny_linear(x, w), x, w, None, None, dtype)
    _check(skinny_gemm.skinny_linear(x, w, b, r), x, w, b, r, dtype)


def test_leading_dims_and_the_block_sites(triton_path):
    """[B, H, K] inputs keep their leading dims; block_linear / block_linear_of /
    linear_residual run the kernel, equal to F.linear in float64."""
    from ate_fast.models.direct_weights import linear_residual

    x = torch.randn(2, 7, 48, dtype=F64)
    layer = torch.nn.Linear(48, 32, dtype=F64)
    plain = torch.nn.Linear(48, 32, bias=False, dtype=F64)
    res = torch.randn(2, 7, 32, dtype=F64)
    with (
        torch.no_grad(),
        mock.patch.object(skinny_gemm, "skinny_linear", wraps=skinny_gemm.skinny_linear) as kernel,
    ):
        outs = [
            skinny_gemm.block_linear(x, layer.weight, layer.bias),
            skinny_gemm.block_linear_of(layer, x),
            linear_residual(plain, x, res),
        ]
    assert kernel.call_count == 3
    refs = [F.linear(x, layer.weight, layer.bias)] * 2 + [res + F.linear(x, plain.weight)]
    for got, ref in zip(outs, refs):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


def test_where_torch_runs_instead(triton_path):
    """Unselected, more than MAX_ROWS rows, N or K not a multiple of 16, a misaligned,
    non-contiguous or other-dtype operand, or autograd recording: torch's GEMM (the kernel
    has no backward; it is compiled for aligned operands)."""
    w = torch.randn(16, 32)
    x = torch.randn(50, 32)
    assert skinny_gemm.takes(x, w)
    assert not skinny_gemm.takes(torch.randn(65, 32), w)
    assert not skinny_gemm.takes(torch.randn(50, 40), torch.randn(16, 40))
    assert not skinny_gemm.takes(x, torch.randn(24, 32))
    assert not skinny_gemm.takes(torch.randn(50 * 32 + 1)[1:].view(50, 32), w)
    assert not skinny_gemm.takes(x.to(F64), w)
    assert not skinny_gemm.takes(torch.randn(32, 50).T, w)
    with torch.enable_grad():
        assert not skinny_gemm.takes(x.requires_grad_(True), w)
    triton_path.setenv(skinny_gemm.ENV_VAR, "torch")
    assert not skinny_gemm.takes(torch.randn(50, 32), w)
    triton_path.delenv(skinny_gemm.ENV_VAR)
    assert not skinny_gemm.takes(torch.randn(50, 32), w)


def test_torch_compile_traces_torch_gemms(triton_path):
    """Under torch.compile (fullgraph) the head traces torch's GEMMs and equals the eager
    head, which runs the kernel."""
    assert_compile_traces_torch_ops(skinny_gemm, "skinny_linear")


def test_settings_are_checked(triton_path):
    triton_path.setenv(skinny_gemm.ENV_VAR, "cublas")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_SKINNY_GEMM: expected one of"):
        skinny_gemm.selected_path()
    triton_path.setenv(skinny_gemm.ENV_VAR, "triton")
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, "48")
    with pytest.raises(InvalidArgumentError, match="BLOCK_N: expected one of"):
        skinny_gemm.block_n()
    triton_path.delenv(skinny_gemm.BLOCK_N_VAR)
    assert skinny_gemm.block_n() == skinny_gemm.DEFAULT_BLOCK_N


def test_head_and_captured_sampler_match_torch(triton_path):
    """float64: the head's forward and input-VJP, and a captured Euler loop with one q|kv
    GEMM (fuse_qkv), with the kernel equal the torch GEMM's to rounding; the kernel ran at
    every projection of every block (4 per block and forward)."""
    head = small_head()
    head.fuse_qkv = True
    # head(), forward_with_vjp(): every block's 4 GEMMs
    assert_path_matches(triton_path, skinny_gemm.ENV_VAR, "triton", "torch", skinny_gemm,
                        "skinny_linear", head, 1e-12, per_block=4)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_n", skinny_gemm.BLOCK_NS)
def test_pi0_shapes_on_cuda(triton_path, dtype, block_n):
    """π0's four projections at B = 1 (50 rows) on the GPU, against float64."""
    triton_path.setenv(skinny_gemm.BLOCK_N_VAR, str(block_n))
    for k, n in [(1024, 2560), (2048, 1024), (1024, 8192), (4096, 1024)]:
        x, w, b, r = _operands(50, k, n, dtype, "cuda")
        _check(skinny_gemm.skinny_linear(x, w, None, r), x, w, None, r, dtype)
        _check(skinny_gemm.skinny_linear(x, w, b), x, w, b, None, dtype)
