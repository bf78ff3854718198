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

from ate_fast.argument_checks import check_choice

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

    check_choice("precision", precision, PRECISIONS)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if precision == "fp32":
        return out
    caster = _GraphCaster(out, precision)
    nodes = []
    for node in out.graph.node:
        nodes.extend(caster.rewrite(node))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    caster.drop_stale_types()
    _drop_unused_initializers(out.graph)
    prop = next((p for p in out.metadata_props if p.key == PRECISION_METADATA_KEY), None)
    if prop is None:
        prop = out.metadata_props.add()
        prop.key = PRECISION_METADATA_KEY
    prop.value = precision
    return out


class _GraphCaster:
    """Rewrites one node at a time: low-precision inputs (cast activations, low-type
    weight initializers) for the compute-heavy ops, their output cast back to float32."""

    def __init__(self, model: Any, precision: str) -> None:
        graph = model.graph
        self.graph, self.precision = graph, precision
        self.low, self.ops = _low_type(precision), LOW_PRECISION_OPS[precision]
        self.floats = _float_tensors(model)
        self.initializers = {init.name: init for init in graph.initializer}
        self.taken = {name for node in graph.node for name in (*node.input, *node.output)}
        self.taken |= set(self.initializers) | {i.name for i in graph.input}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.low_names: dict[str, str] = {}  # float32 tensor -> its low-precision twin
        self.retyped: set[str] = set()  # outputs whose type changed to the low type

    def fresh(self, base: str) -> str:
        name, i = f"{base}__{self.precision}", 0
        while name in self.taken:
            i += 1
            name = f"{base}__{self.precision}_{i}"
        self.taken.add(name)
        return name

    def _weight_transpose(self, node: Any) -> bool:
        """A Transpose of a float32 weight that only low-precision nodes read (Linear
        weights are exported so): the weight itself is stored in the low type."""
        from onnx import TensorProto

        if node.op_type != "Transpose" or node.input[0] not in self.initializers:
            return False
        if self.initializers[node.input[0]].data_type != TensorProto.FLOAT:
            return False
        readers = self.consumers.get(node.output[0], [])
        return bool(readers) and all(r.op_type in self.ops for r in readers)

    def _low_weight(self, name: str) -> str:
        if name not in self.low_names:
            self.low_names[name] = self.fresh(name)
            self.graph.initializer.append(
                _low_initializer(self.initializers[name], self.low_names[name], self.precision)
            )
        return self.low_names[name]

    def rewrite(self, node: Any) -> list:
        """``node`` and the Cast nodes it needs, in order."""
        from onnx import TensorProto, helper

        if self._weight_transpose(node):
            node.input[0] = self._low_weight(node.input[0])
            self.low_names[node.output[0]] = node.output[0]  # a transpose of low values is low
            self.retyped.add(node.output[0])
            return [node]
        if node.op_type not in self.ops or node.domain not in ("", "ai.onnx"):
            return [node]
        nodes = []
        for i, name in enumerate(node.input):
            if name in self.low_names:
                node.input[i] = self.low_names[name]
                continue
            if not name or name not in self.floats:
                continue
            if name in self.initializers:
                node.input[i] = self._low_weight(name)
                continue
            low = self.low_names[name] = self.fresh(name)
            cast_name = self.fresh(f"cast_{name}")
            nodes.append(helper.make_node("Cast", [name], [low], to=self.low, name=cast_name))
            node.input[i] = low
        result = node.output[0]
        node.output[0] = self.fresh(result)
        back = helper.make_node(
            "Cast", [node.output[0]], [result], to=TensorProto.FLOAT,
            name=self.fresh(f"cast_{result}"),
        )  # fmt: skip
        return [*nodes, node, back]

    def drop_stale_types(self) -> None:
        """Shape inference re-derives the (now low) type of retyped tensors."""
        stale = [info for info in self.graph.value_info if info.name in self.retyped]
        for info in stale:
            self.graph.value_info.remove(info)


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
