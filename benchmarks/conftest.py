"""Benchmark session set-up: Triton on the GPU (never the interpreter), CUDA timing help."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest
import torch


@pytest.fixture
def cuda_sync():
    """A callable that waits for the GPU (a no-op on the CPU)."""
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


@pytest.fixture
def time_calls(benchmark):
    """Time ``fn`` on ``device``: on the GPU a round is ``calls`` launches and one
    synchronisation (``extra_info["calls"]`` lets report.py divide); on the CPU, one call."""

    def run_benchmark(fn, device: str, calls: int, rounds: int) -> None:
        if device != "cuda":
            benchmark.extra_info["calls"] = 1
            benchmark(fn)
            return
        benchmark.extra_info["calls"] = calls

        def batch():
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()

        batch()  # warm-up: allocator, kernel caches
        benchmark.pedantic(batch, rounds=rounds, warmup_rounds=2)

    return run_benchmark
