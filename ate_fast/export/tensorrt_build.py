"""``to_tensorrt``: an exported sampler graph -> a serialized TensorRT engine (``.plan``).

Two API generations, chosen by the installed version (``tensorrt.__version__``):

==============  ==========================================================================
TensorRT 10.x   weakly typed network by default: precision by builder flags
                (``BuilderFlag.FP16`` / ``BF16``; TensorRT picks per-layer precision);
                ``strongly_typed=True`` opts into the TensorRT 11 path below
TensorRT 11.x   every network is strongly typed (the precision flags were removed): the
                ONNX graph is cast first (:func:`ate_fast.export.precision.
                cast_for_precision`), and the ``STRONGLY_TYPED`` creation flag is set
                (accepted, ignored, by 11.x)
==============  ==========================================================================

Both: the ONNX parser, a workspace memory-pool limit, one optimisation profile for the
dynamic batch (min/opt/max), ``build_serialized_network``. The engine is written
atomically, with ``<engine>.json`` beside it recording how it was built and the graph's
signature (read by :class:`ate_fast.export.TensorRTSampler`).

The decisions (:func:`build_plan`) are plain Python and tested everywhere; the calls into
``tensorrt`` run only where it is installed (with a GPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ate_fast.argument_checks import check_choice, check_float, check_int
from ate_fast.export.precision import PRECISIONS, cast_for_precision
from ate_fast.version_checks import release

PathLike = Union[str, "os.PathLike[str]"]
MIN_MAJOR = 10
SIDECAR_SUFFIX = ".json"


class TensorRTUnavailableError(ImportError):
    """``import tensorrt`` failed; the message says how to install it."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse the graph or build (or load) the engine."""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` saying what to do."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package without libnvinfer
        raise TensorRTUnavailableError(
            f"TensorRT is not available ({type(exc).__name__}: {exc}). Install its Python "
            "package where there is an NVIDIA GPU: `pip install tensorrt` (x86_64, SBSA), or "
            "on Jetson the JetPack package python3-libnvinfer (TensorRT 10.3 on JetPack 6). "
            "ONNX export (to_onnx) and OnnxRuntimeSampler do not need it."
        ) from exc
    return tensorrt


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.30"`` -> ``(10, 3, 0)``; ValueError for anything else."""
    return release(text, "TensorRT")


def tensorrt_version() -> tuple[int, int, int]:
    """The installed TensorRT's (major, minor, patch); TensorRTUnavailableError if absent."""
    return parse_version(import_tensorrt().__version__)


@dataclass(frozen=True)
class BuildPlan:
    """How an engine is built for a TensorRT version and a precision.

    Attributes:
        strongly_typed: create the network with ``STRONGLY_TYPED``.
        builder_flags: ``BuilderFlag`` names to set (weak typing only).
        cast_precision: cast the ONNX graph to this precision first (strong typing), or None.
        cleared_flags: ``BuilderFlag`` names to clear: ``TF32`` (on by default) for fp32,
            so that "fp32" means float32 matmuls and convolutions, not TF32's 10-bit mantissa.
    """

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    cast_precision: Optional[str]
    cleared_flags: tuple[str, ...] = ()


def build_plan(
    version: tuple[int, int, int], precision: str, strongly_typed: Optional[bool] = None
) -> BuildPlan:
    """The :class:`BuildPlan` for TensorRT ``version`` (see the module docstring).

    ``strongly_typed``: None picks the version's way (10.x: builder flags; 11+: strong
    typing); True forces strong typing on 10.x; False is refused on 11+.
    """
    check_choice("precision", precision, PRECISIONS)
    if strongly_typed is not None and not isinstance(strongly_typed, bool):
        raise TypeError(f"strongly_typed must be a bool or None, got {strongly_typed!r}")
    major = version[0]
    if major < MIN_MAJOR:
        raise TensorRTBuildError(
            f"TensorRT {'.'.join(map(str, version))} is too old: ate_fast.export needs "
            f"TensorRT >= {MIN_MAJOR} (the named-tensor API, execute_async_v3)"
        )
    if major >= 11:
        if strongly_typed is False:
            raise ValueError(
                f"strongly_typed=False: TensorRT {major}.x builds strongly typed networks only "
                "(its FP16/BF16 builder flags were removed); precision comes from casting the "
                "ONNX graph"
            )
        typed = True
    else:
        typed = bool(strongly_typed)
    cleared = ("TF32",) if precision == "fp32" else ()
    if typed:
        cast = None if precision == "fp32" else precision
        return BuildPlan(True, (), cast, cleared)
    flags = {"fp16": ("FP16",), "bf16": ("BF16",), "fp32": ()}[precision]
    return BuildPlan(False, flags, None, cleared)


def batch_profile(
    shape: tuple[int, ...], min_batch: int, opt_batch: int, max_batch: int, name: str
) -> Optional[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes for an input whose one dynamic (-1) dim is the batch;
    None for a static input."""
    dynamic = [i for i, d in enumerate(shape) if d < 0]
    if not dynamic:
        return None
    if len(dynamic) > 1:
        raise TensorRTBuildError(
            f"input {name!r} has several dynamic dims {shape}; exported sampler graphs have "
            "only the batch dimension dynamic"
        )
    axis = dynamic[0]

    def at(batch: int) -> tuple[int, ...]:
        return tuple(batch if i == axis else d for i, d in enumerate(shape))

    return at(min_batch), at(opt_batch), at(max_batch)


def _check_build_arguments(
    onnx_path: Path, precision: Any, workspace_gb: Any, batches: tuple[Any, Any, Any]
) -> None:
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {onnx_path}")
    check_choice("precision", precision, PRECISIONS)
    check_float("workspace_gb", workspace_gb, 0.0, above=True)
    for name, value in zip(("min_batch", "opt_batch", "max_batch"), batches):
        check_int(name, value, 1)
    if not batches[0] <= batches[1] <= batches[2]:
        raise ValueError(f"batches must satisfy min_batch <= opt_batch <= max_batch, got {batches}")


def sidecar_path(engine_path: PathLike) -> Path:
    """``policy.plan`` -> ``policy.plan.json``."""
    path = Path(engine_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_tensorrt(
    onnx_path: PathLike,
    engine_path: PathLike,
    precision: str = "fp16",
    workspace_gb: float = 4.0,
    min_batch: int = 1,
    opt_batch: Optional[int] = None,
    max_batch: Optional[int] = None,
    *,
    strongly_typed: Optional[bool] = None,
    builder_optimization_level: Optional[int] = None,
    timing_cache: Optional[PathLike] = None,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine from a graph written by :func:`ate_fast.export.to_onnx`.

    Args:
        onnx_path: the ``.onnx`` file.
        engine_path: where to write the serialized engine (``.plan``).
        precision: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (see the module docstring for how
            each TensorRT generation applies it).
        workspace_gb: the builder's workspace memory-pool limit, GiB.
        min_batch, opt_batch, max_batch: the optimisation profile of the dynamic batch
            (``opt_batch`` defaults to ``min_batch``: control-rate inference is batch 1;
            ``max_batch`` to 8, or the graph's own ``max_batch`` when smaller, which it
            may not exceed). Ignored for a static-batch graph.
        strongly_typed: None: TensorRT 10 weak typing with builder flags, TensorRT 11
            strong typing; True: strong typing on 10.x too.
        builder_optimization_level: TensorRT's 0..5 (None: its default, 3).
        timing_cache: a file of TensorRT's layer timings: read when it exists, written
            back (with this build's new timings) after the build. A rebuild of the same
            shapes — new weights, another precision of the same graph — then skips most
            tactic timing (minutes for a π0-sized expert on a Jetson). TensorRT refuses a
            cache from another TensorRT version or GPU: :class:`TensorRTBuildError`, which
            names the file to delete.
        verbose: TensorRT's verbose log (to see why a build fails).

    Returns:
        ``engine_path``. Raises :class:`TensorRTUnavailableError` where ``tensorrt``
        cannot be imported, :class:`TensorRTBuildError` when parsing or building fails.
    """
    import onnx

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path: no ONNX file at {onnx_path}")
    # the metadata only: the weights (1.26 GB for the π0 expert) load when the graph is cast
    model = onnx.load(str(onnx_path), load_external_data=False)
    signature = next((p.value for p in model.metadata_props if p.key == "ate_fast"), None)
    batches = _batch_range(signature, min_batch, opt_batch, max_batch)
    _check_build_arguments(onnx_path, precision, workspace_gb, batches)
    trt = import_tensorrt()
    plan = build_plan(parse_version(trt.__version__), precision, strongly_typed)
    if plan.cast_precision is not None:
        model = cast_for_precision(onnx.load(str(onnx_path)), plan.cast_precision)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse(trt, builder, logger, plan, model, onnx_path)
    config = _builder_config(trt, builder, plan, workspace_gb, builder_optimization_level)
    cache = None if timing_cache is None else _attach_timing_cache(config, Path(timing_cache))
    dynamic = _add_batch_profile(builder, network, config, batches)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT could not build an engine from {onnx_path} (precision={precision}); "
            "rerun with verbose=True to see why"
        )
    _write_atomic(engine_path, bytes(serialized))
    if cache is not None:  # this build's timings added to what was read
        _write_atomic(Path(timing_cache), bytes(cache.serialize()))
    record = {
        "tensorrt_version": trt.__version__, "precision": precision, "plan": asdict(plan),
        "workspace_gb": workspace_gb, "batch_profile": list(batches) if dynamic else None,
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "onnx": str(onnx_path), "signature": json.loads(signature) if signature else None,
    }  # fmt: skip
    _write_atomic(sidecar_path(engine_path), json.dumps(record, indent=2).encode())
    return engine_path


def _parse(trt: Any, builder: Any, logger: Any, plan: BuildPlan, model: Any, onnx_path: Path):
    """The network TensorRT's ONNX parser makes of the graph (the cast one, if cast)."""
    flags = 0
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if plan.cast_precision is None:
        parsed = parser.parse_from_file(str(onnx_path))
    else:  # the cast graph lives in memory; `path` resolves any external weights
        parsed = parser.parse(model.SerializeToString(), str(onnx_path))
    if not parsed:
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
    return network


def _builder_config(
    trt: Any, builder: Any, plan: BuildPlan, workspace_gb: float, optimization_level: Any
) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    return config


def _batch_range(
    signature: Optional[str], min_batch: int, opt_batch: Optional[int], max_batch: Optional[int]
) -> tuple[int, int, int]:
    """``(min, opt, max)`` of the batch profile: ``opt`` defaults to ``min``, ``max`` to 8 or
    the graph's recorded ``max_batch`` (its ``signature``) when smaller, which it may not
    exceed."""
    graph_max = json.loads(signature).get("max_batch") if signature else None
    max_batch = min(8, graph_max or 8) if max_batch is None else max_batch
    if graph_max is not None and isinstance(max_batch, int) and max_batch > graph_max:
        raise ValueError(
            f"max_batch: {max_batch} is more than the graph's max_batch {graph_max} (the "
            "batch range it was exported for); export with a larger max_batch"
        )
    return min_batch, min_batch if opt_batch is None else opt_batch, max_batch


def _attach_timing_cache(config: Any, path: Path) -> Any:
    """The timing cache read from ``path`` (a new, empty one where there is no file) set on
    ``config``; raises :class:`TensorRTBuildError` where TensorRT refuses it."""
    if path.is_dir():
        raise ValueError(f"timing_cache: {path} is a directory; expected a file")
    data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # no mismatch ignored: another GPU's timings
        raise TensorRTBuildError(
            f"timing_cache: TensorRT refused {path} (written by another TensorRT version, GPU "
            "or build settings?); delete it, or pass another path, to start a new one"
        )
    return cache


def _add_batch_profile(builder: Any, network: Any, config: Any, batches: tuple) -> bool:
    """The dynamic batch's (min, opt, max) profile on every input that has one; returns
    whether any input is dynamic."""
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = batch_profile(tuple(tensor.shape), *batches, tensor.name)
        if shapes is not None:
            profile.set_shape(tensor.name, *shapes)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    return dynamic
