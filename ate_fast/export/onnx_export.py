"""``to_onnx``: a whole sampler — policy head, K steps, guidance — as one ONNX graph.

Pipeline: :class:`~ate_fast.export.sampler_graph.SamplerGraph` (the sampler's own loop on
the ops' torch references) → ``torch.export.export`` (non-strict; the batch dimension
symbolic) → ``torch.onnx.export(..., dynamo=True)`` with onnxscript's optimiser (constant
folding) → input/output names, the ``batch`` dim name, metadata →
``onnx.checker.check_model(full_check=True)`` (includes shape inference) → the TensorRT
operator check (:mod:`ate_fast.export.tensorrt_ops`).

``torch.ops.ate_fast.*`` custom ops never reach the graph: the loop is traced through
their references, and a model function that itself calls ``ate_fast.ops.guided_step`` or
``mlp_guidance`` has those calls decomposed into their references
(``ExportedProgram.run_decompositions``) before translation. A node outside the default
ONNX domain is an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ate_fast._version import __version__
from ate_fast.argument_checks import check_int
from ate_fast.errors import InvalidArgumentError
from ate_fast.export.guidance_graph import (
    GuidanceExportError,
    guidance_graph,
    guidance_settings,
    rtc_guidance_graph,
)
from ate_fast.export.sampler_graph import (
    TRACEABLE_MODEL,
    ModelTraceError,
    SamplerGraph,
    model_module,
)
from ate_fast.export.signature import (
    ACTIONS,
    BATCH_DIM,
    DELAY,
    METADATA_KEY,
    PREV_CHUNK,
    STEP_NOISE,
    TARGET,
    GraphSignature,
    cond_keys,
    cond_kind,
    cond_leaves,
)
from ate_fast.export.tensorrt_ops import TENSORRT_OPSETS, tensorrt_problems
from ate_fast.guidance import POLICY_VJP
from ate_fast.ops.constants import ACTIVATIONS
from ate_fast.ops.guided_step.ref import guided_step_reference
from ate_fast.ops.mlp_guidance.ref import mlp_guidance_reference
from ate_fast.realtime import RTCGuidance
from ate_fast.sampling.inputs import check_noise
from ate_fast.sampling.sampler import Sampler
from ate_fast.version_checks import at_least

PathLike = Union[str, "os.PathLike[str]"]

# the oldest torch whose torch.export-based ONNX exporter translates the samplers (checked
# 2026-12-06 on the MLP head's flow sampler: torch 2.4 has no ``optimize`` argument and its
# tracer fails on a sliced ModuleList; 2.5 leaves Slice bounds TensorRT cannot parse;
# 2.6 and 2.7 fail to decompose the graph; 2.8 passes every export test)
MIN_TORCH = "2.8"
# torch's exporter emits opset 18 natively (torchlib); 20 is the newest opset TensorRT 10
# parses. Below 18 would need a down-conversion that is not reliable.
SUPPORTED_OPSETS = (18, 19, 20)
DEFAULT_OPSET = 18
MAX_BATCH = 1 << 16
# Above this many bytes of weights the graph is saved with an external data file
# (protobuf caps a single file at 2 GiB); the graph is assembled in memory as one
# ModelProto, which caps the weights at a little under 2 GiB (≈ 450 M float32 parameters).
_EXTERNAL_DATA_BYTES = 1 << 30
_MAX_WEIGHT_BYTES = (1 << 31) - (64 << 20)


class ExportError(RuntimeError):
    """``to_onnx`` could not produce a valid graph; the message says why and what to do."""


def require_export_dependencies() -> None:
    """Raise ImportError with the install command if onnx or onnxscript is missing, or
    naming the torch needed where torch is older than :data:`MIN_TORCH`."""
    if not at_least(torch.__version__, MIN_TORCH, "torch"):
        raise ImportError(
            f"ate_fast.export needs torch >= {MIN_TORCH} (its torch.export-based ONNX "
            f"exporter), this is torch {torch.__version__}: pip install 'torch>={MIN_TORCH}'"
        )
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"ate_fast.export needs {' and '.join(missing)}: pip install 'ate_fast[export]' "
            "(onnx, onnxruntime, onnxscript)"
        )


def planned_step_noise_draws(sampler: Sampler) -> int:
    """How many [B, H, D] step-noise draws one ``sample()`` call makes."""
    return int(np.count_nonzero(sampler.step_noise_draws))


def _ate_fast_decompositions() -> dict:
    """torch.ops.ate_fast.* -> their torch references (for model functions calling them)."""

    def guided_step(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp):
        return guided_step_reference(x, m, a, b, g, c, m_prev, d, z, s, scale, clamp)

    def mlp_guidance(x, weights, biases, activation, target, a0, mask, eps, distance_weight):
        return mlp_guidance_reference(
            x, weights, biases, ACTIVATIONS[activation], target, a0, mask, eps, distance_weight
        )

    return {
        torch.ops.ate_fast.guided_step.default: guided_step,
        torch.ops.ate_fast.mlp_guidance.default: mlp_guidance,
    }


def _uses_ate_fast_ops(program: Any) -> bool:
    for node in program.graph.nodes:
        name = getattr(node.target, "name", None)
        if node.op == "call_function" and callable(name) and name().startswith("ate_fast::"):
            return True
    return False


def _check_arguments(
    sampler: Any, example_noise: Any, dynamic_batch: Any, opset: Any, path: Any
) -> None:
    if not isinstance(sampler, Sampler):
        raise TypeError(
            "sampler must be an ate_fast sampler (FlowSampler or DiffusionSampler), got "
            f"{type(sampler).__name__}"
        )
    check_noise(example_noise)
    if example_noise.dtype != torch.float32:
        raise TypeError(
            f"example_noise must be float32, got {example_noise.dtype}: graphs are exported in "
            "float32, and the engine's precision is chosen when it is built "
            "(to_tensorrt(precision='fp16'|'bf16'|'fp32'))"
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"opset must be one of {SUPPORTED_OPSETS}, got {opset!r}: torch's ONNX exporter "
            f"emits opset {DEFAULT_OPSET} natively, and TensorRT 10's ONNX parser reads opsets "
            f"{TENSORRT_OPSETS[0]}..{TENSORRT_OPSETS[1]}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    module = model_module(sampler.model_fn)
    if module is not None and module.training:
        raise ValueError(
            f"the sampler's model ({type(module).__name__}) is in training mode: call "
            ".eval() before exporting (dropout and normalisation statistics would be traced "
            "in training mode)"
        )


def _with_batch(t: Tensor, batch: int) -> Tensor:
    """``t`` [B, ...] repeated/cut to ``batch`` rows (batch 1 examples are traced at 2:
    torch.export specialises a dimension of size 1)."""
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch].contiguous()


def _rename_dim(model: Any, old: str, new: str) -> None:
    graph = model.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new


def _batch_symbol(model: Any) -> Optional[str]:
    for info in model.graph.input:
        if info.name != STEP_NOISE:
            dim = info.type.tensor_type.shape.dim[0]
            if dim.dim_param:
                return dim.dim_param
    return None


def to_onnx(
    sampler: Sampler,
    path: PathLike,
    example_noise: Tensor,
    example_cond: Any = None,
    guidance: Any = None,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    *,
    target_input: bool = True,
    max_batch: int = MAX_BATCH,
    require_tensorrt_ops: bool = True,
) -> Path:
    """Export ``sampler``'s whole K-step loop (with ``guidance``) to one ONNX graph.

    Args:
        sampler: a FlowSampler or DiffusionSampler whose ``model_fn`` is traceable (an
            ``nn.Module`` in eval mode, or a function of torch ops).
        path: where to write the ``.onnx`` file (weights over 1 GiB go to ``<path>.data``).
        example_noise: ``[B, H, D]`` float32 noise; fixes H, D, the device and (with
            ``dynamic_batch=False``) the batch.
        example_cond: the model's ``cond`` for that batch: None, a Tensor [B, ...], or a
            flat dict/list/tuple of tensors [B, ...] (each becomes a graph input).
        guidance: None, an :class:`ate_fast.steer.LatentGuidance` over ``ate_fast.align``'s
            MLP or Transformer encoder (its scale, clamp, mode, mask and weights are baked
            in), or an :class:`ate_fast.realtime.RTCGuidance` (real-time chunking; the
            model must have its own input-VJP, ``forward_with_vjp``, as ``ate_fast.models``'
            MLPHead and FlowTransformerHead do; with ``jacobian=False``, as LeRobot's RTC,
            any traceable model): the graph then takes the previous chunk ``prev_chunk``
            [B, H, D] and the delay ``delay`` int64 [B] as inputs (s, β, the mask schedule
            and the mode are baked in).
        dynamic_batch: the batch dimension is symbolic (``batch``, 1..``max_batch``).
        opset: the ONNX opset, 18 (default), 19 or 20.
        target_input: guided graphs take z* as the input ``target`` [B, d_z]; False bakes
            ``guidance.target`` into the graph.
        max_batch: the largest batch a dynamic graph declares.
        require_tensorrt_ops: raise if a node is not in TensorRT's ONNX operator table
            (False: warn), so that a graph that cannot become an engine is caught here.

    Returns:
        The path written. The graph's inputs and output are described in
        :mod:`ate_fast.export.signature`; its settings are in its ``ate_fast`` metadata.

    Raises:
        TypeError / ValueError naming the argument; :class:`ModelTraceError` when
        ``model_fn`` cannot be traced (the message says what to change);
        :class:`~ate_fast.export.guidance_graph.GuidanceExportError` for guidance that
        cannot be written as forward ops; :class:`ExportError` when the exporter or the
        ONNX checks fail. Stochastic samplers (DDPM; DDIM with eta > 0) get a
        ``step_noise`` input instead of drawing noise in the graph.
    """
    require_export_dependencies()
    _check_arguments(sampler, example_noise, dynamic_batch, opset, path)
    _check_batch_settings(example_noise, guidance, dynamic_batch, max_batch, target_input)
    leaves = cond_leaves(example_cond)
    _check_cond_batch(leaves, example_noise.shape[0])
    _check_model_fits_examples(sampler, example_noise, example_cond)
    graph = _sampler_graph(sampler, example_noise, example_cond, guidance, target_input)
    inputs, names = _trace_inputs(graph, example_noise, leaves, guidance, dynamic_batch)
    program = _trace(graph, inputs, names, dynamic_batch, max_batch)
    model = _translate(program, names, opset, dynamic_batch)
    signature = _signature(graph, sampler, example_noise, leaves, guidance, target_input)
    signature = replace(
        signature, dynamic_batch=dynamic_batch, opset=opset,
        max_batch=max_batch if dynamic_batch else None,
    )  # fmt: skip
    prop = model.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, signature.to_json()
    model.producer_name = "ate_fast.export"
    model.doc_string = f"ate_fast sampler graph: {sampler!r}"
    check_graph(model)
    _check_tensorrt_ops(model, require_tensorrt_ops)
    return save_model(model, path)


def _check_cond_batch(leaves: list, batch: int) -> None:
    for name, tensor in leaves:
        if tensor.ndim == 0 or tensor.shape[0] != batch:
            raise ValueError(
                f"example_cond: {name} must have the batch dimension of example_noise ({batch}) "
                f"first, got shape {tuple(tensor.shape)}"
            )


def _check_model_fits_examples(sampler: Sampler, example_noise: Tensor, example_cond: Any) -> None:
    """One eager model call on the examples before tracing, so that inputs of the wrong
    shape are reported as such (naming the shapes) instead of as a tracing failure."""
    name, times = next(iter(sampler.model_times.items()))
    dtype = torch.int64 if np.issubdtype(np.asarray(times).dtype, np.integer) else torch.float32
    t = torch.full((example_noise.shape[0],), times[0], dtype=dtype, device=example_noise.device)
    shapes = ", ".join(f"{n} {list(v.shape)}" for n, v in cond_leaves(example_cond))
    given = f"noise {list(example_noise.shape)}" + (f", cond {shapes}" if shapes else "")
    try:
        with torch.no_grad():
            out = sampler.model_fn(example_noise, t, example_cond)
    except Exception as exc:
        raise InvalidArgumentError(
            f"example inputs ({given}) do not fit the sampler's model_fn: one eager call "
            f"model_fn(x, {name} [B], cond) on them raised {type(exc).__name__}: {exc}. "
            "Export with examples of the shapes the model takes."
        ) from exc
    if not isinstance(out, Tensor) or out.shape != example_noise.shape:
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidArgumentError(
            f"model_fn must return a tensor of example_noise's shape {list(example_noise.shape)} "
            f"for the examples ({given}), got {got}"
        )


def _sampler_graph(
    sampler: Sampler, example_noise: Tensor, example_cond: Any, guidance: Any, target_input: bool
) -> SamplerGraph:
    """The sampler's loop as an ``nn.Module`` with the guidance's forward-op graph."""
    scale, clamp = sampler.check_guidance(guidance)
    guide, replaced = None, None
    # RTC in either mode (its prefix is a graph input), or another policy_vjp guidance
    # (refused there, with the reason)
    rtc = isinstance(guidance, RTCGuidance) or getattr(guidance, "mode", None) == POLICY_VJP
    if rtc:
        guide = rtc_guidance_graph(guidance, sampler.model_fn, example_noise.shape[1])
        replaced = sampler.guidance_coefficients(guidance)
    elif guidance is not None:
        guide = guidance_graph(guidance, target_input, example_noise.shape[0])
    if guide is not None:
        guide.to(example_noise.device)
    kind = cond_kind(example_cond)
    return SamplerGraph(
        sampler, scale, clamp, guide, kind, cond_keys(example_cond),
        target_input=guide is not None and not rtc and target_input,
        step_noise_draws=planned_step_noise_draws(sampler), device=example_noise.device,
        prefix_inputs=rtc, replaced=replaced,
    )  # fmt: skip


def _trace_inputs(
    graph: SamplerGraph, example_noise: Tensor, leaves: list, guidance: Any, dynamic_batch: bool
) -> tuple[list[Tensor], list[str]]:
    """The example inputs ``torch.export`` traces with, and their graph input names."""
    trace_batch = max(example_noise.shape[0], 2) if dynamic_batch else example_noise.shape[0]
    inputs = [_with_batch(example_noise, trace_batch)]
    names = ["noise"]
    for name, tensor in leaves:
        inputs.append(_with_batch(tensor, trace_batch))
        names.append(name)
    if graph.target_input:
        target = guidance.target.to(device=example_noise.device, dtype=torch.float32)
        target = target.reshape(-1, target.shape[-1])
        inputs.append(_with_batch(target, trace_batch))
        names.append(TARGET)
    if graph.prefix_inputs:
        prev = guidance.prev_chunk
        prev = torch.zeros_like(example_noise) if prev is None else prev
        inputs.append(_with_batch(prev.to(example_noise.device, torch.float32), trace_batch))
        inputs.append(torch.zeros(trace_batch, dtype=torch.int64, device=example_noise.device))
        names += [PREV_CHUNK, DELAY]
    if graph.step_noise_draws:
        shape = (graph.step_noise_draws, trace_batch, *example_noise.shape[1:])
        draws = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # not the
        inputs.append(draws.to(example_noise.device))  # caller's global RNG
        names.append(STEP_NOISE)
    return inputs, names


def _trace(
    graph: SamplerGraph, inputs: list, names: list, dynamic_batch: bool, max_batch: int
) -> Any:
    """``torch.export`` of the sampler graph (batch symbolic when ``dynamic_batch``), with
    any ``torch.ops.ate_fast`` call of the model decomposed into its reference."""
    dynamic_shapes = None
    if dynamic_batch:
        dim = torch.export.Dim(BATCH_DIM, min=1, max=max_batch)
        axes = [{1: dim} if name == STEP_NOISE else {0: dim} for name in names]
        # forward(noise, *inputs): the varargs are one entry, absent when there are none
        dynamic_shapes = (axes[0], tuple(axes[1:])) if len(axes) > 1 else (axes[0],)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                graph, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False
            )
    except ModelTraceError:
        raise
    except Exception as exc:
        if isinstance(exc.__cause__, ModelTraceError):
            raise exc.__cause__ from exc
        hint = (
            " The batch dimension must stay symbolic: if the model fixes the batch size, "
            "export with dynamic_batch=False."
            if dynamic_batch
            else ""
        )
        raise ExportError(
            f"torch.export could not trace the sampler: {type(exc).__name__}: {exc}.{hint} "
            f"{TRACEABLE_MODEL}"
        ) from exc
    if _uses_ate_fast_ops(program):
        program = program.run_decompositions(_ate_fast_decompositions())
    return program


def _translate(program: Any, names: list, opset: int, dynamic_batch: bool) -> Any:
    """The traced program as an ONNX ``ModelProto`` (optimised, batch dim named)."""
    weight_bytes = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    weight_bytes += sum(
        t.numel() * t.element_size() for t in program.constants.values() if isinstance(t, Tensor)
    )
    if weight_bytes > _MAX_WEIGHT_BYTES:
        raise ExportError(
            f"the sampler's weights take {weight_bytes / 2**30:.2f} GiB in float32; to_onnx "
            "assembles the graph as one in-memory ModelProto, which protobuf caps at 2 GiB"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, (), dynamo=True, opset_version=opset, input_names=names,
                output_names=[ACTIONS], optimize=True, verbose=False, report=False,
            )  # fmt: skip
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export could not translate the traced sampler: {type(exc).__name__}: {exc}"
        ) from exc
    model = onnx_program.model_proto
    symbol = _batch_symbol(model)
    if dynamic_batch and symbol is None:
        raise ExportError("the exported graph lost its dynamic batch dimension (exporter bug?)")
    if symbol is not None and symbol != BATCH_DIM:
        _rename_dim(model, symbol, BATCH_DIM)
    return model


def _signature(
    graph: SamplerGraph,
    sampler: Sampler,
    example_noise: Tensor,
    leaves: list,
    guidance: Any,
    target_input: bool,
) -> GraphSignature:
    """What the graph's inputs and settings are (its ``ate_fast`` metadata; the caller
    fills in ``dynamic_batch`` and ``opset``)."""
    guide = graph.guide
    return GraphSignature(
        horizon=int(example_noise.shape[1]),
        action_dim=int(example_noise.shape[2]),
        cond_kind=graph.cond_kind,
        cond_keys=graph.cond_keys,
        cond_shapes=[list(t.shape[1:]) for _, t in leaves],
        target_dim=guide.latent_dim if graph.target_input else None,
        prefix_inputs=graph.prefix_inputs,
        step_noise_draws=graph.step_noise_draws,
        dynamic_batch=True,
        batch=int(example_noise.shape[0]),
        sampler=repr(sampler),
        num_steps=sampler.num_steps,
        guidance=None if guide is None else guidance_settings(guidance, guide, target_input),
        opset=DEFAULT_OPSET,
        ate_fast_version=__version__,
    )


def _check_tensorrt_ops(model: Any, required: bool) -> None:
    problems = tensorrt_problems(model)
    if problems:
        message = "the graph has nodes TensorRT's ONNX parser does not support:\n  " + (
            "\n  ".join(problems[:20])
        )
        if required:
            raise ExportError(message + "\n(pass require_tensorrt_ops=False to keep it anyway)")
        warnings.warn(message, stacklevel=3)


def check_graph(model: Any) -> None:
    """``onnx.checker`` (full check, with shape inference) and the custom-op rule;
    raises :class:`ExportError`."""
    import onnx

    custom = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"the graph contains custom-domain ops {custom} (exporter bug?)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc


def _check_batch_settings(
    example_noise: Tensor, guidance: Any, dynamic_batch: bool, max_batch: int, target_input: bool
) -> None:
    """``max_batch`` and ``target_input``, and what they exclude, named before tracing
    (torch.export's error for them blames the model)."""
    check_int("max_batch", max_batch, 2)
    if not isinstance(target_input, bool):
        raise TypeError(f"target_input must be a bool, got {type(target_input).__name__}")
    batch = example_noise.shape[0]
    if dynamic_batch and batch > max_batch:
        raise ValueError(
            f"example_noise has batch {batch} but max_batch is {max_batch}: the example batch "
            "must lie in the graph's batch range 1..max_batch"
        )
    baked = None if target_input else getattr(guidance, "target", None)
    if dynamic_batch and isinstance(baked, Tensor) and baked.ndim == 2:
        raise GuidanceExportError(
            f"guidance.target is a batch of {baked.shape[0]} latents: baked, it fixes the "
            "graph's batch; pass one latent [d_z], dynamic_batch=False, or target_input=True"
        )


def save_model(model: Any, path: PathLike) -> Path:
    """Write ``model`` to ``path`` (weights to ``<name>.data`` beside it when large).

    Written in a temporary folder beside ``path`` and moved into place: ONNX appends
    external data to an existing file, so a re-export to the same path grew ``.data`` by a
    copy of the weights each time; and an interrupted export leaves the old files whole.
    A stale ``<name>.data`` goes when the new graph holds its weights inline."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    size = sum(int(np.prod(init.dims, dtype=np.int64)) * 4 for init in model.graph.initializer)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if size > _EXTERNAL_DATA_BYTES:
            onnx.save_model(
                model, str(staging / path.name), save_as_external_data=True,
                all_tensors_to_one_file=True, location=data.name,
            )  # fmt: skip
            os.replace(staging / data.name, data)
        else:
            onnx.save_model(model, str(staging / path.name))
            data.unlink(missing_ok=True)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_signature(path: PathLike) -> GraphSignature:
    """The :class:`GraphSignature` stored in an exported ``.onnx`` file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSignature.from_model(model, str(path))


def metadata_json(path: PathLike) -> str:
    """The graph's ``ate_fast`` metadata as indented JSON (for the CLI and engine sidecars)."""
    return json.dumps(json.loads(read_signature(path).to_json()), indent=2)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max|actual − expected| / max|expected|`` (the normwise relative error used for
    parity; a zero ``expected`` compares absolutely)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    return err / scale if scale > 0 else err
