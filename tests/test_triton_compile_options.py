"""Every Triton kernel launch of the package passes ``COMPILE_OPTIONS``
(:mod:`ate_fast.ops.triton_resources`): multiplies and adds contracted into FMAs, the
setting every GPU measurement was taken with, where Triton 3.10 is to stop contracting by
default. The launches are found in the source (a kernel is any ``@triton.jit`` function of
the module; a launch, ``kernel[grid](...)``), so a new launcher without the options fails
here; ``tests/test_triton_offline_compile.py`` checks the compile got them (no warning)."""

from __future__ import annotations

import ast
from pathlib import Path

import ate_fast
from ate_fast.ops.triton_resources import COMPILE_OPTIONS

PACKAGE = Path(ate_fast.__file__).parent


def _jit_functions(tree: ast.Module) -> set[str]:
    """Names of the module's functions decorated ``@triton.jit`` (or ``@triton.jit(...)``)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if ast.unparse(target) == "triton.jit":
                    names.add(node.name)
    return names


def _launches() -> list[tuple[str, int, ast.Call]]:
    """``(file, line, call)`` of every ``kernel[grid](...)`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        kernels = _jit_functions(tree)
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Subscript) and ast.unparse(func.value) in kernels:
                found.append((str(path.relative_to(PACKAGE)), node.lineno, node))
    return found


def test_compile_options_contract_multiply_adds():
    assert COMPILE_OPTIONS == {"enable_fp_fusion": True}


def test_every_kernel_launch_passes_the_compile_options():
    launches = _launches()
    # 26 when written: the scan finds the launchers of all eight Triton modules
    assert len(launches) >= 26 and len({f for f, _, _ in launches}) >= 8, launches
    missing = [
        f"{f}:{line}"
        for f, line, call in launches
        if not any(
            k.arg is None and ast.unparse(k.value) == "COMPILE_OPTIONS" for k in call.keywords
        )
    ]
    assert not missing, f"Triton launches without **COMPILE_OPTIONS: {missing}"
