"""Fixtures for the LeRobot integration tests (run in the LeRobot environment:
``bash tests_lerobot/run.sh``). Real LeRobot policies, tiny and offline, random weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from tiny_policies import make_tiny_diffusion, make_tiny_smolvla


@pytest.fixture(scope="session")
def smolvla_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("smolvlm")


@pytest.fixture
def smolvla(smolvla_root):
    return make_tiny_smolvla(smolvla_root)


@pytest.fixture(params=["DDPM", "DDIM"])
def diffusion(request):
    return make_tiny_diffusion(scheduler=request.param)


@pytest.fixture
def ddpm():
    return make_tiny_diffusion(scheduler="DDPM")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
