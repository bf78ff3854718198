"""Test session set-up.

Triton kernels run on the CPU through the interpreter unless the caller chose
otherwise: ``TRITON_INTERPRET`` must be set before triton is first imported (the GPU
suite sets ``TRITON_INTERPRET=0`` to run them on the GPU). Tests marked ``cuda``
execute CUDA kernels and are skipped only when no GPU is present.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="cuda test: no GPU present on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
