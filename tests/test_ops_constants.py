"""The constants Python shares with the C++/CUDA and Triton kernels agree with the one
header that defines them (csrc/include/ate_fast/constants.h), and no other C++ file
defines them again."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ate_fast.ops import constants

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "ate_fast" / "constants.h"


def _enum(text: str, name: str) -> dict[str, int]:
    body = re.search(rf"enum class {name} : int \{{(.*?)\}};", text, flags=re.S)
    assert body, f"enum {name} not found in {HEADER}"
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body.group(1))}


def _constexpr(text: str, name: str) -> int:
    found = re.search(rf"constexpr int {name} = (\d+);", text)
    assert found, f"constexpr {name} not found in {HEADER}"
    return int(found.group(1))


def test_dtype_codes_match_the_header():
    text = HEADER.read_text()
    header = _enum(text, "DType")
    names = {"kFloat32": torch.float32, "kFloat64": torch.float64,
             "kFloat16": torch.float16, "kBFloat16": torch.bfloat16}  # fmt: skip
    assert {names[k]: v for k, v in header.items()} == constants.DTYPE_CODES
    assert _constexpr(text, "kNumDTypes") == len(constants.DTYPE_CODES)


def test_activation_codes_match_the_header():
    text = HEADER.read_text()
    header = _enum(text, "Activation")
    assert {k[1:].lower(): v for k, v in header.items()} == {
        name: code for code, name in enumerate(constants.ACTIVATIONS)
    }
    assert _constexpr(text, "kNumActivations") == len(constants.ACTIVATIONS)


def test_max_layers_match_the_header():
    assert _constexpr(HEADER.read_text(), "kMaxMlpLayers") == constants.MAX_MLP_LAYERS


def test_defined_once_in_cpp():
    """Every other source includes constants.h instead of repeating a value."""
    pattern = re.compile(r"enum class (DType|Activation)\b|constexpr int kMaxMlpLayers\b")
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu") and path != HEADER:
            assert not pattern.search(path.read_text()), f"{path} redefines a shared constant"


def test_triton_kernels_take_the_codes_from_constants():
    """The Triton kernels' activations come from one module, whose codes are the
    constants' (no kernel compares ``ACT`` with a literal)."""
    from ate_fast.ops import triton_activations as ta

    names = ("gelu", "silu", "relu", "tanh")
    assert [ta.GELU, ta.SILU, ta.RELU, ta.TANH] == [constants.ACTIVATIONS.index(n) for n in names]
    assert ta.NONE == constants.NO_ACTIVATION and ta.NONE not in range(len(names))
    for path in ("ops/mlp_guidance/triton.py", "steer/transformer_triton.py",
                 "models/skinny_gemm_triton.py", "ops/triton_activations.py"):  # fmt: skip
        source = (ROOT / "ate_fast" / path).read_text()
        assert not re.search(r"ACT [!=]= -?\d", source), path
    source = (ROOT / "ate_fast" / "ops" / "triton_activations.py").read_text()
    assert "ACTIVATIONS.index(" in source
