"""``ate_fast.info()`` / ``ate-fast info``: versions and which backends run where, and why not."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
from typing import Any, Callable

import torch

from ate_fast import native
from ate_fast._version import __version__
from ate_fast.models import (
    block_epilogues,
    cpu_gemm,
    fused_mlp,
    gemm_attention,
    l2_prefetch,
    skinny_gemm,
    split_kv_attention,
    split_sdpa_attention,
)
from ate_fast.ops import backends, pdl_setting, split_counters, weight_packs
from ate_fast.ops.mlp_guidance import dispatch as mlp_guidance_dispatch
from ate_fast.sampling import guidance_stream
from ate_fast.steer.transformer_vjp import HALF_PRECISION_MAX_BATCH, selected_path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_module() -> dict:
    module = native.load("_C_cuda")
    if module is None:
        return {"built": False, "reason": native.reason("_C_cuda")}
    entry = {"built": True, "archs": module.archs, "cudart": module.runtime_version()}
    try:
        entry["devices"] = module.device_count()
    except RuntimeError as exc:
        entry["devices"] = 0
        entry["device_error"] = str(exc)
    return entry


def _cpu_module() -> dict:
    module = native.load("_C")
    if module is None:
        return {"built": False, "reason": native.reason("_C")}
    return {"built": True, "openmp": bool(module.openmp), "threads": module.num_threads()}


def info() -> dict:
    """Versions, native modules, and each backend's availability per device type.

    Returns a dict: ``versions``, ``native`` (per module: built or why not), ``gpus``,
    and ``backends`` mapping backend -> device type -> ``{"available", "reason"}``.
    """
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}"}
            )
    table = {}
    for backend in backends.BACKENDS:
        table[backend] = {}
        for device_type in ("cpu", "cuda"):
            ok, why = backends.availability(backend, device_type)
            table[backend][device_type] = {"available": ok, "reason": why}
    return {
        "versions": {
            "ate_fast": __version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "diffusers": _version("diffusers"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"),
            "tensorrt": _version("tensorrt"),
        },
        "native": {"_C": _cpu_module(), "_C_cuda": _cuda_module()},
        "build": native.build_info(),
        "gpus": gpus,
        "backends": table,
        "forced_backend": _or_error(backends.forced_backend),
        "triton_interpret": backends.triton_interpret(),
        "transformer_guidance": _transformer_guidance_paths(),
        "flow_epilogues": {
            d: _or_error(lambda d=d: block_epilogues.selected_path(d)) for d in ("cpu", "cuda")
        },
        "cpu_gemm": _cpu_gemm(),
        "cpu_weight_packs": _cpu_weight_packs(),
        "skinny_gemm": _or_error(_skinny_gemm),
        "prefix_attention": _or_error(_prefix_attention),
        "guidance_stream": _or_error(guidance_stream.selected_path),
        "l2_prefetch": _or_error(l2_prefetch.selected_path),
        "fused_mlp": _or_error(_fused_mlp),
        "triton_pdl": _or_error(lambda: "on" if pdl_setting.selected() else "off"),
        "mlp_guidance_unroll": _or_error(mlp_guidance_dispatch.cuda_unroll),
        "split_reduce": _or_error(
            lambda: "in-kernel when captured" if split_counters.in_kernel() else "second kernel"
        ),
    }


def _prefix_attention() -> str:
    """The block's attention against its prefix, with the split-key kernels' tile setting."""
    path = split_kv_attention.selected_path()
    if path == "split_sdpa":
        return f"{path} ({split_sdpa_attention.chunks_from_env()} key slices)"
    if path == "gemm":  # how its bf16 / fp16 scores reach float32 on CUDA
        if gemm_attention.float32_output_gemm():
            return f"{path} (bf16/fp16 scores written in float32 by cuBLAS)"
        return f"{path} (bf16/fp16 q and k upcast first: this torch has no bmm out_dtype)"
    fields = split_kv_attention.tiles_from_env() if path == "split_kv" else None
    if not fields:
        return path
    return f"{path} ({', '.join(f'{k}={v}' for k, v in fields.items())})"


def _fused_mlp() -> str:
    """The block MLP's path at few rows, with the persistent kernel's tiles."""
    path = fused_mlp.selected_path()
    if path != "persistent":
        return path
    tiles = dataclasses.asdict(fused_mlp.tiles_from_env())
    return f"{path} ({', '.join(f'{k}={v}' for k, v in tiles.items())})"


def _skinny_gemm() -> str:
    """The block GEMMs' path at few rows, with the Triton kernel's column tile and K split."""
    if skinny_gemm.selected_path() != "triton":
        return skinny_gemm.selected_path()
    split = skinny_gemm.split_k() or "auto"
    return f"triton (BLOCK_N {skinny_gemm.block_n()}, split K {split})"


def _or_error(read: Callable[[], Any], errors: tuple = (ValueError,)) -> Any:
    """``read()`` (a selector reading its ``ATE_FAST_*`` variable), or ``"error: ..."``
    when it raises one of ``errors`` (the variable names nothing valid): reported, so that
    the rest of the report still prints."""
    try:
        return read()
    except errors as exc:
        return f"error: {exc}"


def _cpu_gemm() -> str:
    """The CPU float32 GEMM of the heads and encoders (or the env variable's error)."""
    choice = _or_error(cpu_gemm.selected_gemm, (ValueError, RuntimeError))
    if choice.startswith("error: "):
        return choice
    vendor = cpu_gemm.cpu_vendor() or "unknown vendor"
    return f"{choice} ({vendor}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()})"


def _cpu_weight_packs() -> str:
    """Whether a captured CPU sampler packs its oneDNN weights once (or why not)."""
    enabled = _or_error(weight_packs.packing_enabled)
    if isinstance(enabled, str):
        return enabled
    ok, why = weight_packs.packing_available()
    return f"unavailable: {why}" if not ok else ("on" if enabled else "off")


def _transformer_guidance_paths() -> dict:
    """Device type -> the Transformer-encoder guidance path (or the env variable's error);
    ``<device> B=1``: a batch of one's, and ``<device> bf16 B<=N``: half precision's up to
    the largest batch it covers, where they differ."""
    paths = {d: _or_error(lambda d=d: selected_path(d)) for d in ("cpu", "cuda")}
    for d in ("cpu", "cuda"):
        single = _or_error(lambda d=d: selected_path(d, 1))
        if single != paths[d]:
            paths[f"{d} B=1"] = single
        largest = HALF_PRECISION_MAX_BATCH.get(d, 1)
        half = _or_error(lambda d=d, n=largest: selected_path(d, n, torch.bfloat16))
        if largest > 1 and half != paths[d]:
            paths[f"{d} bf16/fp16 B<={largest}"] = half
    return paths


def format_info(data: dict) -> str:
    """Human-readable form of :func:`info` (what ``ate-fast info`` prints)."""
    lines = ["ate_fast environment", ""]
    for key, value in data["versions"].items():
        lines.append(f"{key:<12} {value if value is not None else 'not installed'}")
    lines.append("")
    cpu = data["native"]["_C"]
    if cpu["built"]:
        lines.append(
            f"_C (CPU)     built; OpenMP {'on' if cpu['openmp'] else 'off'}, "
            f"{cpu['threads']} threads"
        )
    else:
        lines.append(f"_C (CPU)     unavailable: {cpu['reason']}")
    cuda = data["native"]["_C_cuda"]
    if cuda["built"]:
        major, minor = divmod(cuda["cudart"] // 10, 100)
        where = (
            f"{cuda['devices']} GPU(s)"
            if cuda["devices"]
            else f"no GPU ({cuda.get('device_error', 'none visible')})"
        )
        lines.append(f"_C_cuda      compiled for {cuda['archs']} (cudart {major}.{minor}); {where}")
    else:
        lines.append(f"_C_cuda      unavailable: {cuda['reason']}")
    for gpu in data["gpus"]:
        lines.append(
            f"GPU {gpu['index']}        {gpu['name']} (sm_{gpu['capability'].replace('.', '')})"
        )
    lines.append("")
    lines.append(f"{'backend':<8} {'cpu':<6} {'cuda':<6} why not")
    for backend, per_device in data["backends"].items():
        marks = ["yes" if per_device[dt]["available"] else "no" for dt in ("cpu", "cuda")]
        reasons = sorted(
            {f"{dt}: {v['reason']}" for dt, v in per_device.items() if not v["available"]}
        )
        lines.append(f"{backend:<8} {marks[0]:<6} {marks[1]:<6} {'; '.join(reasons)}")
    lines += _path_lines(data)
    forced = data["forced_backend"]
    if forced and forced.startswith("error: "):
        lines.append(f"\nATE_FAST_BACKEND {forced}")
    elif forced:
        lines.append(f"\nATE_FAST_BACKEND={forced} forces that backend")
    return "\n".join(lines)


def _path_lines(data: dict) -> list[str]:
    """The kernel paths part of :func:`format_info`: each path in force and the variables
    that choose it."""
    lines: list[str] = []
    paths = data["transformer_guidance"]
    lines.append(
        "\nguidance through the Transformer encoder: "
        + ", ".join(f"{where} {path}" for where, path in paths.items())
        + " (ATE_FAST_TRANSFORMER_GUIDANCE=autograd|vjp|compiled|triton forces one)"
    )
    epilogues = data["flow_epilogues"]
    lines.append(
        f"flow-transformer block epilogues: cpu {epilogues['cpu']}, cuda {epilogues['cuda']}"
        " (ATE_FAST_FLOW_EPILOGUES=torch|triton|native forces one)"
    )
    lines.append(
        f"flow-transformer block GEMMs at <= {skinny_gemm.MAX_ROWS} rows: {data['skinny_gemm']}"
        " (ATE_FAST_SKINNY_GEMM=torch|triton, ATE_FAST_SKINNY_GEMM_BLOCK_N,"
        " ATE_FAST_SKINNY_GEMM_SPLIT_K)"
    )
    lines.append(
        f"flow-transformer attention against the prefix: {data['prefix_attention']}"
        " (ATE_FAST_PREFIX_ATTENTION=sdpa|split_kv|flex|split_sdpa|gemm, ATE_FAST_SPLIT_KV_TILES,"
        " ATE_FAST_SPLIT_SDPA_CHUNKS)"
    )
    lines.append(
        f"latent guidance (mode direct) on CUDA: {data['guidance_stream']} stream as the model"
        " (ATE_FAST_GUIDANCE_STREAM=same|side)"
    )
    lines.append(
        f"flow-transformer MLP weights into L2 during attention: {data['l2_prefetch']}"
        " (ATE_FAST_L2_PREFETCH=off|mlp|all)"
    )
    lines.append(
        f"flow-transformer MLP at <= {fused_mlp.MAX_ROWS} rows: {data['fused_mlp']}"
        " (ATE_FAST_FUSED_MLP=torch|persistent, ATE_FAST_FUSED_MLP_TILES)"
    )
    lines.append(
        f"flow-transformer block's Triton kernels with programmatic dependent launch:"
        f" {data['triton_pdl']} (ATE_FAST_TRITON_PDL=off|on; on needs sm_90 or later)"
    )
    lines.append(
        f"split GEMM / attention slices reduced, persistent MLP counters zeroed:"
        f" {data['split_reduce']}"
        " (ATE_FAST_SPLIT_REDUCE=auto|kernel)"
    )
    lines.append(
        f"MLP-guidance CUDA kernel's loop unroll: {data['mlp_guidance_unroll']}"
        " (ATE_FAST_MLP_GUIDANCE_UNROLL=4|16)"
    )
    lines.append(
        f"CPU float32 GEMMs (heads, encoder VJP): {data['cpu_gemm']}"
        " (ATE_FAST_CPU_GEMM=auto|onednn|aten)"
    )
    lines.append(
        f"captured CPU samplers' oneDNN weights packed once: {data['cpu_weight_packs']}"
        " (ATE_FAST_CPU_WEIGHT_PACKS=on|off)"
    )
    return lines
