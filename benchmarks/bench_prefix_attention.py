"""Attention of π0's action rows against its prefix: torch's SDPA backends and the split-key
Triton kernels (``ate_fast.models.split_kv_attention_triton``) at many tiles.

Run:  pytest benchmarks/bench_prefix_attention.py --benchmark-json=bench_pa.json
      python benchmarks/report.py bench_pa.json

Shape: π0's step (``pi0-expert``, bf16): per sample 400 query rows (50 action tokens × 8
heads folded onto the one key/value head, as the head calls it) against 866 keys (816 prefix
+ 50 action tokens) of 256 dims; B ∈ {1, 8}. A timed call is one step's 18 blocks, each with
its own q, k, v (as the blocks read), captured once in a CUDA graph and replayed; µs are per
block (``extra_info["calls"]`` counts blocks, so report.py divides by them).

Rows (``impl``): ``eager`` = ``sdpa``, torch's own choice (what the head runs by default:
the ratios' baseline, named ``eager`` for report.py); ``sdpa_flash``, ``sdpa_efficient``,
``sdpa_cudnn``: one backend forced (``torch.nn.attention.sdpa_kernel``; a backend that
cannot run the shape is skipped with torch's reason); ``sdpa_gqa`` and ``flex_gqa``: the
400 rows viewed as 8 query heads of 50 rows (``[B, 8, 50, hd]``, no copy: attention's rows
are independent, so any regrouping of them is exact, and the output's view back is the
head's layout) against the one key/value head with ``enable_gqa=True`` — SDPA as torch
picks it, and ``flex_attention`` under ``torch.compile`` (whose decoding kernel splits the
keys over the GPU for queries this short: torch's own split-key attention), as
``ate_fast.models.flex_prefix_attention`` runs it in the head;
``split_sdpa_c<n>``: the keys in about n slices of whole 64-key tiles, each slice a head of
one call of torch's flash-attention kernel, combined by log-sum-exp (one Triton kernel;
``ate_fast.models.split_sdpa_attention``, ``ATE_FAST_PREFIX_ATTENTION=split_sdpa``);
``gemm``: q·kᵀ written in float32 by cuBLAS, a softmax kernel, P·v — products spread over
the GPU (``ate_fast.models.gemm_attention``, ``ATE_FAST_PREFIX_ATTENTION=gemm``; its softmax
in Triton as the block's epilogues run);
``triton_<tiles>``: the split-key
kernels at one :class:`Tiles` — ``q``/``k`` the query and key tiles, ``s`` a fixed number of
key slices (1: one kernel, no combine) or ``auto`` with programs per SM, ``w`` warps. Every
row is checked against float64 SDPA first (2e-2, bf16's rounding).

The tiles are those that compile for sm_90 without register spills (or with ≤ 24 B), from
``tests/triton_offline_compile.py``'s check. Before the first CUDA case every tile compiles
at once in worker processes (Triton's cache on disk then serves the cases; one after another
they take ≈ 2–4 s each). A winner runs in a whole sampler with
``ATE_FAST_PREFIX_ATTENTION=split_kv ATE_FAST_SPLIT_KV_TILES=block_q=…,block_k=…,splits=…``
(bench_realsize's ``ate_capture_split_kv_attention`` row).

On the CPU with ``TRITON_INTERPRET=1``: a dry run at a small shape (the code path, no
timing worth reading).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import pytest
import torch
import torch.nn.functional as F
from cuda_graphs import graphed

from ate_fast.models import flex_prefix_attention as flex
from ate_fast.models import gemm_attention as gemm
from ate_fast.models import split_sdpa_attention as split_sdpa
from ate_fast.models.split_kv_attention_triton import Tiles, split_kv_attention

# (rows, keys, head dim, blocks) per device: π0's step on CUDA; a small dry run on the CPU
SHAPES = {"cuda": (400, 866, 256, 18), "cpu": (40, 90, 32, 2)}
BATCHES = {"cuda": (1, 8), "cpu": (1,)}
GPU_CALLS = 10
TOLERANCE = 2e-2
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_cudnn": "CUDNN_ATTENTION"}  # fmt: skip
GQA_ROWS = ("sdpa_gqa", "flex_gqa")
# split_sdpa_c<n>: the keys in about n slices of whole 64-key tiles, each a head of one
# flash-attention call, combined by log-sum-exp (ATE_FAST_PREFIX_ATTENTION=split_sdpa,
# ATE_FAST_SPLIT_SDPA_CHUNKS=n; π0's 866 keys at n = 8: 6 slices of 128 and 98 more); on
# the CPU's dry run 90 keys: one slice of 64 and 26 more
SPLIT_SDPA_CHUNKS = {"cuda": (4, 8, 16), "cpu": (4,)}


def _sweep() -> list[Tiles]:
    """The tiles timed on CUDA (bf16, 256 dims): per (block_q, block_k, warps) that compiles
    on sm_90 without spills (32 × 64 and 64 × 32: 24 B), its key splits — n > 0 a fixed n
    (1: one kernel), 0 the SM-filling split at one program per SM, −2 at two."""
    shapes = {(16, 32, 8): (1, 4, 0, -2), (16, 64, 8): (1, 2, 4, 0), (32, 32, 8): (1, 4, 8, 0, -2),
              (32, 32, 4): (0,), (32, 64, 8): (1, 2, 4, 0), (64, 32, 8): (1, 2, 4, 0)}  # fmt: skip
    return [
        Tiles(q, k, max(s, 0), programs_per_sm=max(-s, 1), warps=w, stages=2)
        for (q, k, w), splits in shapes.items()
        for s in splits
    ]


SWEEP = {"cuda": _sweep(), "cpu": [Tiles(16, 16, splits=1), Tiles(16, 32, splits=0)]}


def label(tiles: Tiles) -> str:
    """``triton_q32k64s4w8``; ``…auto1…`` for the SM-filling split at 1 program per SM."""
    split = f"s{tiles.splits}" if tiles.splits else f"auto{tiles.programs_per_sm}"
    return f"triton_q{tiles.block_q}k{tiles.block_k}{split}w{tiles.warps}"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cases():
    for device in ("cuda", "cpu"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if device == "cpu" and not _interpreted():
            continue  # the Triton rows need the interpreter on the CPU
        impls = ["eager"] + (list(SDPA_BACKENDS) if device == "cuda" else []) + list(GQA_ROWS)
        impls += [f"split_sdpa_c{n}" for n in SPLIT_SDPA_CHUNKS[device]] + ["gemm"]
        impls += [label(t) for t in SWEEP[device]]
        for batch in BATCHES[device]:
            for impl in impls:
                yield pytest.param(device, batch, impl, id=f"{device}-B{batch}-{impl}")


def _inputs(device: str, batch: int, seed: int) -> tuple:
    """q [B, 1, rows, hd]; k, v: the first ``keys`` rows of [B, 1, keys + 16, hd] buffers
    (views into a longer cache, as the head's prefix slots are), in bf16 (float32 on the
    CPU: the interpreter)."""
    rows, keys, hd, _ = SHAPES[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.randn(batch, 1, n, hd, generator=g).to(device, dtype)

    return rand(rows), rand(keys + 16)[:, :, :keys], rand(keys + 16)[:, :, :keys]


def _precompile_one(device: str, tiles: Tiles, batch: int) -> str:
    """In a worker: one launch of the kernels at ``tiles`` (fills Triton's disk cache)."""
    try:
        q, k, v = _inputs(device, batch, 0)
        split_kv_attention(q, k, v, tiles)
        if device == "cuda":
            torch.cuda.synchronize()
        return ""
    except Exception as exc:  # the case itself reports it; here only the cache matters
        return f"{label(tiles)}: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def compiled_sweep():
    """Every CUDA tile compiled at once, in up to 16 worker processes (on the CPU's dry run
    the same workers run the interpreter: the mechanics, checked)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _interpreted():
        return
    jobs = [(device, t, b) for b in BATCHES[device] for t in SWEEP[device]]
    workers = min(len(jobs), os.cpu_count() or 1, 16)
    context = multiprocessing.get_context("spawn")  # CUDA cannot fork
    # a worker that dies breaks the pool and a stuck one times out (no hang; 60 s: well
    # within the suite's 110 s per benchmark file): the cases then compile one by one
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        errors = [e for e in pool.map(_precompile_one, *zip(*jobs), timeout=60) if e]
    except (BrokenProcessPool, FutureTimeout) as exc:
        errors = [f"precompile stopped: {type(exc).__name__}: {exc}"]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    print(f"precompiled {len(jobs)} launches in {workers} processes; errors: {errors}")


def _sdpa_gqa(q, k, v):
    """SDPA of the rows grouped as ``flex_prefix_attention`` groups them (π0: 8 query heads
    of 50 rows) on the one key/value head (torch ≥ 2.5): views in and out, no copy."""
    batch, _, rows, hd = q.shape
    heads = flex.query_heads(rows)
    grouped = q.view(batch, heads, rows // heads, hd)
    return F.scaled_dot_product_attention(grouped, k, v, enable_gqa=True).view(q.shape)


def _attention(impl: str, device: str):
    """``(q, k, v) -> [B, 1, rows, hd]`` of one row."""
    if impl == "eager":
        return F.scaled_dot_product_attention
    if impl == "sdpa_gqa":
        return _sdpa_gqa
    if impl == "flex_gqa":  # what ATE_FAST_PREFIX_ATTENTION=flex runs in the head
        return flex.flex_prefix_attention
    if impl == "gemm":  # what ATE_FAST_PREFIX_ATTENTION=gemm runs
        return gemm.gemm_attention
    if impl.startswith("split_sdpa_c"):  # what ATE_FAST_PREFIX_ATTENTION=split_sdpa runs
        chunks = int(impl.removeprefix("split_sdpa_c"))
        return lambda q, k, v: split_sdpa.split_sdpa_attention(q, k, v, chunks)
    if impl in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl])

        def forced(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return forced
    tiles = {label(t): t for t in SWEEP[device]}[impl]
    return lambda q, k, v: split_kv_attention(q, k, v, tiles)


@pytest.mark.parametrize(("device", "batch", "impl"), list(_cases()))
def test_prefix_attention(benchmark, time_calls, compiled_sweep, device, batch, impl):
    blocks = SHAPES[device][3]
    inputs = [_inputs(device, batch, seed) for seed in range(blocks)]
    attend = _attention(impl, device)
    q, k, v = inputs[0]
    try:
        got = attend(q, k, v)
    except (RuntimeError, TypeError, ImportError) as exc:
        # a forced backend that cannot run the shape; a torch without enable_gqa or flex
        if impl not in (*SDPA_BACKENDS, *GQA_ROWS):
            raise
        pytest.skip(f"{impl} cannot run this shape with torch {torch.__version__}: {exc}")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error = ((got.double() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE, f"{impl}: relative error {error}"

    def step():
        return [attend(*qkv) for qkv in inputs]

    fn = graphed(step) if device == "cuda" else step
    rows, keys, hd, _ = SHAPES[device]
    benchmark.group = f"{device} prefix attention B={batch} rows={rows} keys={keys} hd={hd}"
    tiles = {label(t): dataclasses.asdict(t) for t in SWEEP[device]}.get(impl)
    benchmark.extra_info.update(impl=impl, device=device, batch=batch, tiles=tiles)
    if impl.startswith("split_sdpa_c"):
        benchmark.extra_info["env"] = {
            "ATE_FAST_PREFIX_ATTENTION": "split_sdpa",
            "ATE_FAST_SPLIT_SDPA_CHUNKS": impl.removeprefix("split_sdpa_c"),
        }
    if impl == "gemm":
        benchmark.extra_info["env"] = {"ATE_FAST_PREFIX_ATTENTION": "gemm"}
    if tiles:  # the row's tiles as the setting that runs them in a whole sampler
        benchmark.extra_info["env"] = {
            "ATE_FAST_PREFIX_ATTENTION": "split_kv",
            "ATE_FAST_SPLIT_KV_TILES": ",".join(f"{k}={v}" for k, v in tiles.items()),
        }
    time_calls(fn, device, GPU_CALLS, rounds=10)
    # a call is `blocks` attentions: report.py's per-call time is per block
    benchmark.extra_info["calls"] *= blocks
