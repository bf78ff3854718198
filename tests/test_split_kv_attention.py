"""The split-key attention kernels (``ate_fast.models.split_kv_attention``): against SDPA
in float64 / float32 / bfloat16 on random inputs, on the CPU through the Triton interpreter
(and on a GPU where there is one); inside the flow-transformer head and its captured
sampler; and where SDPA must run instead."""

from __future__ import annotations

import itertools
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import (  # tests/ is on sys.path
    LaunchCounter,
    assert_path_matches,
    captured,
    small_head,
)

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import split_kv_attention
from ate_fast.models import split_kv_attention_triton as kernels
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)

F64 = torch.float64
ENV = split_kv_attention.ENV_VAR


@pytest.fixture
def selected(monkeypatch):
    monkeypatch.setenv(ENV, "split_kv")
    return monkeypatch


def _qkv(batch, heads, rows, keys, hd, dtype, device="cpu", spare=3):
    """q [B, heads, rows, hd]; k, v: the first ``keys`` rows of [B, heads, keys + spare, hd]
    buffers (strided views, as the block's prefix slots are)."""
    g = torch.Generator().manual_seed(rows * 7 + keys + hd)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(device, dtype)

    buf_k, buf_v = rand(batch, heads, keys + spare, hd), rand(batch, heads, keys + spare, hd)
    return rand(batch, heads, rows, hd), buf_k[:, :, :keys], buf_v[:, :, :keys]


@pytest.mark.parametrize(
    ("batch", "heads", "rows", "keys", "hd"),
    [(1, 1, 40, 70, 16), (2, 2, 17, 33, 8), (1, 1, 3, 200, 32), (2, 1, 64, 16, 24)],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_matches_sdpa(dtype, batch, heads, rows, keys, hd):
    """The default tiles: keys split into several slices (the CPU aims at 8 programs), a
    ragged last chunk, a head dim that is not a power of two; float64 to 1e-12, float32 to
    1e-5, bfloat16 within the output's rounding plus P's rounding to bfloat16 (as in
    FlashAttention)."""
    q, k, v = _qkv(batch, heads, rows, keys, hd, dtype)
    _assert_sdpa(kernels.split_kv_attention(q, k, v), q, k, v)


def _assert_sdpa(got, q, k, v):
    ref = F.scaled_dot_product_attention(q.to(F64), k.to(F64), v.to(F64))
    tol = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[q.dtype]
    assert got.shape == ref.shape and got.dtype == q.dtype and got.is_contiguous()
    torch.testing.assert_close(got.to(F64), ref, rtol=tol, atol=tol)


TILES = [
    kernels.Tiles(16, 16, splits=1),  # one kernel: no partials, no combine
    kernels.Tiles(32, 16, splits=3, stages=2),  # 3 slices: a non-power-of-two combine
    kernels.Tiles(16, 32, splits=64),  # more slices asked than chunks: one per chunk
    kernels.Tiles(64, 16, programs_per_sm=4, warps=8),
]


@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_every_tiling_matches_sdpa(dtype, tiles):
    """The tiles a benchmark sweeps give SDPA's output: one slice (normalised in the
    partial kernel), a few, one per chunk, and the SM-filling split with wide blocks."""
    q, k, v = _qkv(2, 1, 37, 90, 24, dtype)
    per_split = kernels.key_slices(37, 90, 2, tiles, 8)
    assert per_split % tiles.block_k == 0
    if tiles.splits:
        assert -(-90 // per_split) == min(tiles.splits, -(-90 // tiles.block_k))
    _assert_sdpa(kernels.split_kv_attention(q, k, v, tiles), q, k, v)


@pytest.mark.parametrize("tiles", TILES[1:], ids=str)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_the_last_program_combines_where_counters_are_lent(dtype, tiles):
    """With counters lent (as a captured graph lends them) each query block's last partial
    program combines its rows: no combine kernel launched, SDPA's output to the same
    tolerance (float64 to 1e-12; the other order of the same sums), the counters left
    zero; ``ATE_FAST_SPLIT_REDUCE=kernel`` launches the combine kernel after all."""
    from ate_fast.ops import split_counters

    q, k, v = _qkv(2, 2, 37, 90, 24, dtype)
    counters = split_counters.new_buffer(q.device)
    combines = LaunchCounter(kernels._combine_kernel)
    with mock.patch.object(kernels, "_combine_kernel", combines):
        with split_counters.lend(counters):
            got = kernels.split_kv_attention(q, k, v, tiles)
        assert combines.count == 0
        _assert_sdpa(got, q, k, v)
        assert not counters.any(), "the counters must be left zero"
        with split_counters.lend(counters), mock.patch.dict(os.environ):
            os.environ[split_counters.ENV_VAR] = "kernel"
            _assert_sdpa(kernels.split_kv_attention(q, k, v, tiles), q, k, v)
        assert combines.count == 1


def test_the_keys_are_split_over_programs():
    """π0's step at B = 1 on an H200 (132 SMs): 400 rows, 866 keys — the keys in slices of
    whole chunks, so that about one program per SM runs (SDPA's kernel ran 7: here 13
    query blocks × 10 slices of 3 chunks; one more slice would reach 132); one slice where
    the rows alone fill the GPU."""
    tiles = kernels.default_tiles(torch.bfloat16, 256)
    per_split = kernels.key_slices(400, 866, 1, tiles, 132)
    slices = -(-866 // per_split)
    assert per_split % tiles.block_k == 0 and slices > 1
    assert (slices + 1) * -(-400 // tiles.block_q) >= 132
    assert kernels.key_slices(4096, 866, 8, tiles, 132) >= 866


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"block_q": 24}, "Tiles.block_q: expected a power of two >= 16, got 24"),
     ({"block_k": 8}, "Tiles.block_k: expected a power of two >= 16, got 8"),
     ({"splits": -1}, "expected splits >= 0"),
     ({"warps": 3}, "Tiles.warps: expected a power of two <= 16, got 3")],
)  # fmt: skip
def test_bad_tiles_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        kernels.Tiles(**{"block_q": 16, "block_k": 16, **fields})


def test_where_sdpa_runs_instead(selected):
    q, k, v = _qkv(1, 1, 8, 20, 16, torch.float32)
    assert split_kv_attention.takes(q, k, v, None)
    assert not split_kv_attention.takes(q, k, v, torch.zeros(1, 1, 8, 20))  # a mask
    assert not split_kv_attention.takes(q.to(F64), k, v, None)
    assert not split_kv_attention.takes(q.transpose(-1, -2), k, v, None)
    with torch.enable_grad():
        assert not split_kv_attention.takes(q.requires_grad_(True), k, v, None)
    selected.setenv(ENV, "flash")
    with pytest.raises(InvalidArgumentError, match="ATE_FAST_PREFIX_ATTENTION: expected one"):
        split_kv_attention.selected_path()
    selected.delenv(ENV)
    assert not split_kv_attention.takes(q, k, v, None)


def test_tiles_from_the_environment(selected):
    """``ATE_FAST_SPLIT_KV_TILES`` overrides the named fields of the default tiles (what
    a benchmark found fastest, in a whole sampler); bad names or values name the
    variable."""
    q, k, v = _qkv(1, 1, 20, 50, 16, torch.float32)
    selected.setenv(split_kv_attention.TILES_VAR, "splits=1, block_k=16")
    with mock.patch.object(
        kernels, "split_kv_attention", wraps=kernels.split_kv_attention
    ) as kernel:
        got = split_kv_attention.prefix_attention(q, k, v)
    want = kernels.default_tiles(torch.float32, 16)
    assert kernel.call_args.args[3] == kernels.Tiles(
        want.block_q, 16, 1, want.programs_per_sm, want.warps, want.stages
    )
    _assert_sdpa(got, q, k, v)
    var = split_kv_attention.TILES_VAR
    for text, message in [("block_q=24", f"{var}: Tiles.block_q: expected"),
                          ("splits:4", f"{var}: expected comma-separated"),
                          ("warps=-8", f"{var}: expected comma-separated")]:  # fmt: skip
        selected.setenv(split_kv_attention.TILES_VAR, text)
        with pytest.raises(InvalidArgumentError, match=message):
            split_kv_attention.prefix_attention(q, k, v)
        with pytest.raises(InvalidArgumentError, match=message):  # again: no error cached away
            split_kv_attention.tiles_from_env()
    selected.setenv(split_kv_attention.TILES_VAR, "splits=2")
    first = split_kv_attention.tiles_from_env()
    first["splits"] = 5  # a caller's copy: the parsed setting is not changed through it
    assert split_kv_attention.tiles_from_env() == {"splits": 2}


def test_head_and_captured_sampler_match_sdpa(selected):
    """float64: the head's forward and input-VJP with a prefix cache, and a captured Euler
    loop, equal SDPA's to rounding; the kernels ran in every block."""
    assert_path_matches(selected, ENV, "split_kv", "sdpa", kernels, "split_kv_attention",
                        small_head(), 1e-12)  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pi0_step_on_cuda(dtype):
    """π0's step at B = 1 and 2: 400 rows (8 heads folded) × 866 keys of 256 dims, at the
    default tiles; in bf16 also one slice (no combine) and a fixed four."""
    tilings = [None]
    if dtype == torch.bfloat16:
        tilings += [
            kernels.Tiles(16, 64, splits=1, warps=8),
            kernels.Tiles(32, 32, splits=4, warps=8),
        ]
    for batch, tiles in itertools.product((1, 2), tilings):
        q, k, v = _qkv(batch, 1, 400, 866, 256, dtype, "cuda")
        got = kernels.split_kv_attention(q, k, v, tiles)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol, msg=str(tiles))


@pytest.mark.cuda
def test_pi0_step_combined_in_kernel_on_cuda():
    """π0's step attention (bf16, B = 1, default tiles) with counters lent: each query
    block's last program combines, eagerly and in a CUDA graph replayed on two inputs in
    turn (a count left over from one launch would combine the wrong slices in the next);
    every output against float64 SDPA, no combine kernel launched, the counters left
    zero."""
    from ate_fast.ops import split_counters

    q0, k0, v0 = _qkv(1, 1, 400, 866, 256, torch.bfloat16, "cuda")
    inputs = [(q0, k0, v0), (-q0, k0.flip(2), v0 * 0.5)]
    refs = [
        F.scaled_dot_product_attention(q.double(), k.double(), v.double()) for q, k, v in inputs
    ]
    q, k, v = (t.clone() for t in inputs[0])
    counters = split_counters.new_buffer(q.device)
    with mock.patch.object(kernels, "_combine_kernel", None):  # launching it would raise
        with split_counters.lend(counters):  # eagerly, on this stream
            torch.testing.assert_close(kernels.split_kv_attention(q, k, v).double(), refs[0],
                                       rtol=2e-2, atol=2e-2)  # fmt: skip
        graph, out = captured(lambda: kernels.split_kv_attention(q, k, v), counters)
    for i in range(6):
        for dst, src in zip((q, k, v), inputs[i % 2]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.double(), refs[i % 2], rtol=2e-2, atol=2e-2,
                                   msg=f"replay {i}")  # fmt: skip
    assert not counters.any()
