"""Build: setuptools drives CMake (metadata and dependencies live in pyproject.toml).

Environment:
  ATE_FAST_CUDA=0|1          build the CUDA module (default: when nvcc is found)
  ATE_FAST_CUDA_ARCHS="87;89;90"  CUDA architectures; PTX is added for the newest
  ATE_FAST_BUILD_JOBS=N      parallel compile jobs (default: CPU count)
  ATE_FAST_NO_NATIVE=1       skip the native build entirely (pure-Python package)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """nvcc from CUDACXX, CUDA_HOME/CUDA_PATH, PATH, then /usr/local/cuda."""
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


def find_cmake() -> str:
    try:  # the `cmake` wheel from the build requirements
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise RuntimeError("ate_fast needs CMake >= 3.24 to build its native modules") from None
        return found


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def cuda_plan() -> tuple[bool, str, str | None]:
    """(build the CUDA module?, why / why not, nvcc path)."""
    cuda_env = os.environ.get("ATE_FAST_CUDA", "").strip()
    if cuda_env not in ("", "0", "1"):
        raise ValueError(f"ATE_FAST_CUDA must be 0, 1 or unset, got {cuda_env!r}")
    nvcc = find_nvcc()
    if cuda_env == "1" and nvcc is None:
        raise RuntimeError("ATE_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or CUDACXX)")
    if cuda_env == "0":
        return False, "disabled at build time (ATE_FAST_CUDA=0)", nvcc
    if nvcc is None:
        return False, "nvcc was not found at build time", None
    return True, f"built with {nvcc}", nvcc


class CMakeBuild(build_ext):
    """One CMake build produces every native module; later extensions reuse it."""

    _built = False

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if CMakeBuild._built:
            return None
        CMakeBuild._built = True
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        import pybind11

        with_cuda, cuda_reason, nvcc = cuda_plan()
        archs = os.environ.get("ATE_FAST_CUDA_ARCHS", "87;89;90")
        cmake = find_cmake()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DATE_FAST_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DATE_FAST_CUDA_ARCHS={archs}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja") or _has_ninja_module():
            args += ["-G", "Ninja"]
            if not shutil.which("ninja"):
                import ninja

                args.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}")
        jobs = os.environ.get("ATE_FAST_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)

        # What was built and why, for ate_fast.info(). An editable install imports from
        # the source tree, so the record goes there too.
        info = {
            "cuda_built": with_cuda,
            "cuda_reason": cuda_reason,
            "cuda_archs": archs if with_cuda else None,
        }
        text = json.dumps(info, indent=2) + "\n"
        (out_dir / "_build_info.json").write_text(text)
        if getattr(self, "editable_mode", False) or self.inplace:
            (ROOT / "ate_fast" / "_build_info.json").write_text(text)
        return None


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


def native_extensions() -> list[Extension]:
    if os.environ.get("ATE_FAST_NO_NATIVE") == "1":
        return []
    exts = [CMakeExtension("ate_fast._C")]
    if cuda_plan()[0]:
        exts.append(CMakeExtension("ate_fast._C_cuda"))
    return exts


setup(ext_modules=native_extensions(), cmdclass={"build_ext": CMakeBuild})
