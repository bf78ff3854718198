"""The package's layering holds: no import cycles (between modules, or between the
subpackages), no private name imported from another subpackage, and function-local
imports only where an optional dependency (or a CLI command's handler, to keep
``ate-fast --help`` light) needs them."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ate_fast"
# Imported inside functions on purpose: optional extras (pyproject.toml), and Triton, which
# costs a second to import and is needed only when its backend runs.
OPTIONAL = {
    "triton", "onnx", "onnxruntime", "onnxscript", "tensorrt", "h5py", "pyarrow",
    "metaworld", "mujoco", "gymnasium", "matplotlib", "lerobot",
}  # fmt: skip
# Kernel modules whose only function-local import is their optional dependency.
LAZY_KERNELS = {
    "ate_fast.models.block_epilogues_triton",
    "ate_fast.models.fused_mlp_triton",
    "ate_fast.models.l2_prefetch_triton",
    "ate_fast.models.skinny_gemm_triton",
    "ate_fast.models.split_kv_attention_triton",
    "ate_fast.ops.guided_step.triton",
    "ate_fast.ops.mlp_guidance.triton",
    "ate_fast.steer.transformer_triton",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.AST, top_level: bool):
    """(imported ate_fast module, names, node) for the module's imports; ``top_level``:
    those executed at import time (not in a function, not under TYPE_CHECKING)."""
    body = [tree]
    while body:
        node = body.pop()
        for child in ast.iter_child_nodes(node):
            in_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            type_checking = (
                isinstance(child, ast.If)
                and isinstance(child.test, ast.Name)
                and child.test.id == "TYPE_CHECKING"
            )
            if top_level and (in_function or type_checking):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, [], child
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, child)
                yield source, [a.name for a in child.names], child
            body.append(child)


def _edges() -> dict[str, set[str]]:
    """Module -> the ate_fast modules it imports at import time. ``from pkg import sub``
    points at the submodule; a module's own ancestor packages are left out (a package's
    ``__init__`` re-exporting its children is the intended shape, not a cycle)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for source, names, _ in _imports(name, ast.parse(path.read_text()), top_level=True):
            if not source.startswith("ate_fast"):
                continue
            found = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
            targets.update(found or ([source] if source in MODULES else []))
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges[name] = {t for t in targets if t != name and t not in ancestors}
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles_between_modules():
    assert _cycles(_edges()) == []


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for source, targets in _edges().items():
        a = _subpackage(source)
        graph.setdefault(a, set()).update(
            _subpackage(t) for t in targets if _subpackage(t) not in ("", a)
        )
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_from_other_subpackages(module):
    tree = ast.parse(MODULES[module].read_text())
    for source, names, node in _imports(module, tree, top_level=False):
        if not source.startswith("ate_fast") or _subpackage(source) == _subpackage(module):
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in source.split(".")[1:] if p.startswith("_") and p != "__init__"]
        private = [p for p in private if p not in ("_version", "_C", "_C_cuda")]
        assert not private, f"{module}:{node.lineno} imports {private} from {source}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_local_imports_only_for_optional_dependencies(module):
    if module.endswith(".cli") or module == "ate_fast.demo" or module in LAZY_KERNELS:
        return  # command handlers import what their command needs
    tree = ast.parse(MODULES[module].read_text())
    functions = [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    for function in functions:
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                sources = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                sources = [_resolve(module, node)]
            else:
                continue
            for source in sources:
                allowed = source.split(".")[0] in OPTIONAL or source in LAZY_KERNELS
                assert allowed, f"{module}:{node.lineno} imports {source} inside a function"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_over_80_lines(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{module}:{node.lineno} {node.name} is {length} lines long"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "." in m))
def test_no_package_attribute_hides_a_submodule(module):
    """``pkg.sub`` is the submodule ``sub``: a function of the same name re-exported by
    ``pkg/__init__`` would hide it, and ``import pkg.sub.x as y``, ``mock.patch("pkg.sub.x")``
    and documented spellings such as ``ate_fast.ops.guided_step.prepare_launch`` would fail."""
    parent, _, leaf = module.rpartition(".")
    imported = importlib.import_module(module)
    assert getattr(importlib.import_module(parent), leaf) is imported, (
        f"{parent}.{leaf} is not the module {module}: rename one of them"
    )


def test_the_cli_parser_and_the_package_import_no_torch():
    """``import ate_fast`` and ``ate-fast --help`` (every subcommand's parser) stay cheap:
    torch loads in a command's handler or at a public name's first use (it did not:
    ``ate_fast/__init__`` imported the fused ops, and with them torch)."""
    code = (
        "import sys, ate_fast, ate_fast.cli; ate_fast.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'triton', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
