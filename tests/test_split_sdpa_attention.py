"""The block's attention with its keys in slices, each slice on ATen's flash-attention op,
combined by log-sum-exp (``ATE_FAST_PREFIX_ATTENTION=split_sdpa``,
``ate_fast.models.split_sdpa_attention``; the combine in Triton, interpreted on the CPU):
against float64 SDPA, inside the head and its captured sampler, and where SDPA runs
instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from flow_head_paths import assert_path_matches  # tests/ is on sys.path

from ate_fast.errors import InvalidArgumentError
from ate_fast.models import FlowTransformerHead, split_kv_attention
from ate_fast.models import split_sdpa_attention as split_sdpa
from ate_fast.ops.backends import MIN_TRITON

pytest.importorskip("triton", minversion=MIN_TRITON)
ENV = split_kv_attention.ENV_VAR


@pytest.fixture
def selected(monkeypatch):
    monkeypatch.setenv(ENV, "split_sdpa")
    return monkeypatch


def _qkv(batch, rows, keys, hd, dtype, device="cpu"):
    """q [B, 1, rows, hd] (contiguous); k, v: views of longer buffers (a prefix slot's)."""
    g = torch.Generator().manual_seed(rows + keys)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    buf_k, buf_v = rand(batch, 1, keys + 3, hd), rand(batch, 1, keys + 3, hd)
    return rand(batch, 1, rows, hd), buf_k[:, :, :keys], buf_v[:, :, :keys]


@pytest.mark.parametrize(
    "keys,chunks,want",
    [(866, 8, (128, 6, 98)), (300, 4, (128, 2, 44)), (256, 2, (128, 2, 0)), (22, 8, (22, 1, 0)),
     (816, 16, (64, 12, 48))],
)  # fmt: skip
def test_slices_are_whole_tiles(keys, chunks, want):
    width, full, rest = split_sdpa.slices(keys, chunks)
    assert (width, full, rest) == want
    assert width * full + rest == keys and rest < width


@pytest.mark.parametrize("keys,chunks", [(300, 4), (256, 2), (90, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_sdpa(monkeypatch, dtype, keys, chunks):
    """Every slice count (with and without a shorter last slice; one slice) against float64
    SDPA: float64 to rounding, bf16 within its outputs' two roundings."""
    monkeypatch.setattr(split_sdpa, "TILE_KEYS", 32)  # slices the small key counts too
    q, k, v = _qkv(2, 24, keys, 32, dtype)
    got = split_sdpa.split_sdpa_attention(q, k, v, chunks)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_slices_are_combined_by_their_weights(monkeypatch):
    """Keys whose scores differ by a lot between slices: the combine must weight each
    slice by its log-sum-exp (a plain mean of the slices' outputs would be far off)."""
    monkeypatch.setattr(split_sdpa, "TILE_KEYS", 16)
    q, k, v = _qkv(1, 8, 70, 16, torch.float64)
    k = k.clone()
    k[:, :, :16] *= 8.0  # the first slice dominates the softmax
    got = split_sdpa.split_sdpa_attention(q, k, v, 4)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_head_and_captured_sampler_match_sdpa(selected):
    """float64, one key/value head (the path's case), slices of 4 keys: the head's forward
    and input-VJP with a prefix cache, and a captured Euler loop, equal SDPA's; the path
    ran in every block."""
    selected.setattr(split_sdpa, "TILE_KEYS", 4)
    torch.manual_seed(0)
    head = FlowTransformerHead("small", depth=2, horizon=6, action_dim=3, width=32, mlp_dim=48,
                               num_heads=4, num_kv_heads=1, head_dim=8).double()  # fmt: skip
    assert_path_matches(selected, ENV, "split_sdpa", "sdpa", split_sdpa,
                        "split_sdpa_attention", head, 1e-12)  # fmt: skip


def test_sdpa_runs_where_the_path_does_not_apply(selected):
    """Two key/value heads (the slices would not be a view), a mask: SDPA, not the path."""
    q, k, v = _qkv(1, 8, 90, 16, torch.float32)
    two = (q.expand(1, 2, 8, 16), k.expand(1, 2, 90, 16), v.expand(1, 2, 90, 16))
    assert not split_kv_attention.takes(*two, None, "split_sdpa")
    assert not split_kv_attention.takes(q, k, v, torch.zeros(1, 1, 1, 90), "split_sdpa")
    assert split_kv_attention.takes(q, k, v, None, "split_sdpa")
    assert not split_sdpa.runs_on(torch.zeros(1, 1, 8, 512), torch.zeros(1, 1, 9, 512))


def test_chunks_setting_is_checked(monkeypatch):
    monkeypatch.delenv(split_sdpa.CHUNKS_VAR, raising=False)
    assert split_sdpa.chunks_from_env() == split_sdpa.DEFAULT_CHUNKS
    monkeypatch.setenv(split_sdpa.CHUNKS_VAR, "12")
    assert split_sdpa.chunks_from_env() == 12
    for bad in ("1", "four", "-3"):
        monkeypatch.setenv(split_sdpa.CHUNKS_VAR, bad)
        with pytest.raises(InvalidArgumentError, match=split_sdpa.CHUNKS_VAR):
            split_sdpa.chunks_from_env()


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_pi0_attention_on_cuda(batch):
    """π0's block attention in bf16 (400 rows of one key/value head of 256 against 866
    keys: 6 slices of 128 and 98 more) against float64 SDPA, and replayed in a CUDA graph."""
    q, k, v = _qkv(batch, 400, 866, 256, torch.bfloat16, "cuda")
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    got = split_sdpa.split_sdpa_attention(q, k, v, 8)
    torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = split_sdpa.split_sdpa_attention(q, k, v, 8)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, got, rtol=0, atol=0)
