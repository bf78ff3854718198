"""Benchmark session set-up: Triton on the GPU (never the interpreter), CUDA timing help."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest
import torch


@pytest.fixture
def cuda_sync():
    """A callable that waits for the GPU (a no-op on the CPU)."""
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
