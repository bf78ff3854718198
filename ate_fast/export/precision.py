"""Reduced precision by casting the ONNX graph, for strongly typed TensorRT networks.

TensorRT 11 builds every network strongly typed: the builder's FP16/BF16 flags are gone
and each tensor keeps the type the ONNX graph gives it. :func:`cast_for_precision`
therefore writes the precision into the graph itself (our own pass, in the spirit of
ModelOpt AutoCast but fixed and dependency-free):

- the compute-heavy nodes — ``MatMul``, ``Gemm`` and, for fp16, ``Conv`` /
  ``ConvTranspose`` — run in fp16/bf16: their float32 weight initializers (also those
  read through a ``Transpose``, as exported ``Linear`` weights are) are stored in the low
  type (halving the weight bytes the roofline counts) and their activation inputs are
  cast down;
- their outputs are cast back to float32, so normalisation, softmax, activations and
  the sampler's own update (its state ``x`` across the K steps, the schedule
  coefficients, the guidance correction) stay float32 — as the fused kernels, which
  compute in float32 for half data;
- graph inputs and outputs keep float32.

ONNX's ``Conv``/``ConvTranspose`` accept bfloat16 only from opset 22 (TensorRT 10 parses
up to opset 20), so with bf16 convolutions stay float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PRECISIONS = ("fp16", "bf16", "fp32")
LOW_PRECISION_OPS = {
    "fp16": ("MatMul", "Gemm", "Conv", "ConvTranspose"),
    "bf16": ("MatMul", "Gemm"),
}
PRECISION_METADATA_KEY = "ate_fast.precision"


def _low_type(precision: str) -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bfloat16 bit patterns, rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _low_initializer(init: Any, name: str, precision: str) -> Any:
    from onnx import helper, numpy_helper

    values = numpy_helper.to_array(init).astype(np.float32)
    if precision == "fp16":
        raw = values.astype(np.float16).tobytes()
    else:
        raw = float32_to_bfloat16_bits(values).tobytes()
    return helper.make_tensor(name, _low_type(precision), list(values.shape), raw, raw=True)


def _float_tensors(model: Any) -> set[str]:
    """Names of the float32 tensors of ``model`` (after shape inference)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    names = {
        info.name
        for info in (*graph.input, *graph.value_info, *graph.output)
        if info.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    names |= {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    return names


def cast_for_precision(model: Any, precision: str) -> Any:
    """A copy of ``model`` (``onnx.ModelProto``) whose compute-heavy nodes run in
    ``precision`` (``"fp16"`` or ``"bf16"``; ``"fp32"`` returns an unchanged copy).

    See the module docstring for what is cast. The result passes ``onnx.checker`` and
    records the precision in its metadata (``ate_fast.precision``).
    """
    import onnx
    from onnx import TensorProto, helper

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if precision == "fp32":
        return out
    low, ops = _low_type(precision), LOW_PRECISION_OPS[precision]
    graph = out.graph
    floats = _float_tensors(out)
    initializers = {init.name: init for init in graph.initializer}
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= set(initializers) | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, i = f"{base}__{precision}", 0
        while name in taken:
            i += 1
            name = f"{base}__{precision}_{i}"
        taken.add(name)
        return name

    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def weight_transpose(node: Any) -> bool:
        """A Transpose of a float32 weight that only low-precision nodes read (Linear
        weights are exported so): the weight itself is stored in the low type."""
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            return False
        if initializers[node.input[0]].data_type != TensorProto.FLOAT:
            return False
        readers = consumers.get(node.output[0], [])
        return bool(readers) and all(r.op_type in ops for r in readers)

    low_names: dict[str, str] = {}
    retyped: set[str] = set()
    nodes = []
    for node in graph.node:
        if weight_transpose(node):
            weight = node.input[0]
            if weight not in low_names:
                low_names[weight] = fresh(weight)
                graph.initializer.append(
                    _low_initializer(initializers[weight], low_names[weight], precision)
                )
            node.input[0] = low_names[weight]
            low_names[node.output[0]] = node.output[0]  # a transpose of low values is low
            retyped.add(node.output[0])
            nodes.append(node)
            continue
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name in low_names:
                node.input[i] = low_names[name]
                continue
            if not name or name not in floats:
                continue
            low_names[name] = fresh(name)
            if name in initializers:
                graph.initializer.append(
                    _low_initializer(initializers[name], low_names[name], precision)
                )
            else:
                cast = helper.make_node(
                    "Cast", [name], [low_names[name]], to=low, name=fresh(f"cast_{name}")
                )
                nodes.append(cast)
            node.input[i] = low_names[name]
        result = node.output[0]
        node.output[0] = fresh(result)
        nodes.append(node)
        back = helper.make_node(
            "Cast", [node.output[0]], [result], to=TensorProto.FLOAT, name=fresh(f"cast_{result}")
        )
        nodes.append(back)
    del graph.node[:]
    graph.node.extend(nodes)
    stale = [info for info in graph.value_info if info.name in retyped]
    for info in stale:  # shape inference re-derives their (now low) type
        graph.value_info.remove(info)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    prop = next((p for p in out.metadata_props if p.key == PRECISION_METADATA_KEY), None)
    if prop is None:
        prop = out.metadata_props.add()
        prop.key = PRECISION_METADATA_KEY
    prop.value = precision
    return out
