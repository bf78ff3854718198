"""The ONNX operators TensorRT's ONNX parser supports, and a check of a graph against them.

Data, not code: :data:`TENSORRT_ONNX_OPS` is the operator support matrix of onnx-tensorrt's
``docs/operators.md`` for TensorRT 10 (tag ``10.1-GA``, commit 96e7811, the newest table
published in that repository; the 10.0 and 10.1 tables are identical), reduced to the
operators marked supported, each with the data types the table lists for it. The table's
one typo (``INF64`` for ConstantOfShape) reads ``INT64`` here. TensorRT 10 parses opsets 9
to 20 (:data:`TENSORRT_OPSETS`).

:func:`tensorrt_problems` checks every node of a model: its operator is in the table, the
type of its data tensor (input 0; output 0 for nodes without inputs and ConstantOfShape)
is one the table lists, and the ``axes`` inputs the table requires to be build-time
constants are initializers or ``Constant`` outputs.
"""

from __future__ import annotations

from typing import Any

# The operator support matrix (supported operators only): op -> supported data types.
TENSORRT_ONNX_OPS: dict[str, tuple[str, ...]] = {
    "Abs": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Acos": ("FP32", "FP16", "BF16"),
    "Acosh": ("FP32", "FP16", "BF16"),
    "Add": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "And": ("BOOL",),
    "ArgMax": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ArgMin": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Asin": ("FP32", "FP16", "BF16"),
    "Asinh": ("FP32", "FP16", "BF16"),
    "Atan": ("FP32", "FP16", "BF16"),
    "Atanh": ("FP32", "FP16", "BF16"),
    "AveragePool": ("FP32", "FP16", "BF16"),
    "BatchNormalization": ("FP32", "FP16", "BF16"),
    "Cast": ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"),
    "CastLike": ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"),
    "Ceil": ("FP32", "FP16", "BF16"),
    "Celu": ("FP32", "FP16", "BF16"),
    "Clip": ("FP32", "FP16", "BF16"),
    "Concat": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Constant": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "ConstantOfShape": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Conv": ("FP32", "FP16", "BF16"),
    "ConvTranspose": ("FP32", "FP16", "BF16"),
    "Cos": ("FP32", "FP16", "BF16"),
    "Cosh": ("FP32", "FP16", "BF16"),
    "CumSum": ("FP32", "FP16", "BF16"),
    "DeformConv": ("FP32", "FP16"),
    "DepthToSpace": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "DequantizeLinear": ("INT8", "FP8", "INT4"),
    "Div": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Dropout": ("FP32", "FP16", "BF16"),
    "Einsum": ("FP32", "FP16", "BF16"),
    "Elu": ("FP32", "FP16", "BF16"),
    "Equal": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Erf": ("FP32", "FP16", "BF16"),
    "Exp": ("FP32", "FP16", "BF16"),
    "Expand": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "EyeLike": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Flatten": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Floor": ("FP32", "FP16", "BF16"),
    "Gather": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "GatherElements": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "GatherND": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Gelu": ("FP32", "FP16", "BF16", "INT8", "INT32", "INT64"),
    "Gemm": ("FP32", "FP16", "BF16"),
    "GlobalAveragePool": ("FP32", "FP16", "BF16"),
    "GlobalLpPool": ("FP32", "FP16", "BF16"),
    "GlobalMaxPool": ("FP32", "FP16", "BF16"),
    "Greater": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "GreaterOrEqual": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "GridSample": ("FP32", "FP16"),
    "GroupNormalization": ("FP32", "FP16", "BF16"),
    "GRU": ("FP32", "FP16", "BF16"),
    "HardSigmoid": ("FP32", "FP16", "BF16"),
    "HardSwish": ("FP32", "FP16", "BF16"),
    "Hardmax": ("FP32", "FP16", "BF16"),
    "Identity": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "If": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "ImageScaler": ("FP32", "FP16", "BF16"),
    "InstanceNormalization": ("FP32", "FP16", "BF16"),
    "IsInf": ("FP32", "FP16", "BF16"),
    "IsNaN": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "LayerNormalization": ("FP32", "FP16", "BF16"),
    "LeakyRelu": ("FP32", "FP16", "BF16"),
    "Less": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "LessOrEqual": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Log": ("FP32", "FP16", "BF16"),
    "LogSoftmax": ("FP32", "FP16", "BF16"),
    "Loop": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "LRN": ("FP32", "FP16", "BF16"),
    "LSTM": ("FP32", "FP16", "BF16"),
    "LpNormalization": ("FP32", "FP16", "BF16"),
    "LpPool": ("FP32", "FP16", "BF16"),
    "MatMul": ("FP32", "FP16", "BF16"),
    "Max": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "MaxPool": ("FP32", "FP16", "BF16"),
    "Mean": ("FP32", "FP16", "BF16", "FP8", "INT32", "INT64"),
    "MeanVarianceNormalization": ("FP32", "FP16", "BF16"),
    "Min": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Mish": ("FP32", "FP16"),
    "Mod": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Mul": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Neg": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "NonMaxSuppression": ("FP32", "FP16"),
    "NonZero": ("FP32", "FP16"),
    "Not": ("BOOL",),
    "OneHot": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Or": ("BOOL",),
    "Pad": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ParametricSoftplus": ("FP32", "FP16", "BF16"),
    "Pow": ("FP32", "FP16", "BF16"),
    "PRelu": ("FP32", "FP16", "BF16"),
    "QuantizeLinear": ("FP32", "FP16", "BF16"),
    "RandomNormal": ("FP32", "FP16", "BF16"),
    "RandomNormalLike": ("FP32", "FP16", "BF16"),
    "RandomUniform": ("FP32", "FP16", "BF16"),
    "RandomUniformLike": ("FP32", "FP16", "BF16"),
    "Range": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Reciprocal": ("FP32", "FP16", "BF16"),
    "ReduceL1": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceL2": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceLogSum": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceLogSumExp": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceMax": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceMean": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceMin": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceProd": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceSum": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ReduceSumSquare": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Relu": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Reshape": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Resize": ("FP32", "FP16", "BF16"),
    "ReverseSequence": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "RNN": ("FP32", "FP16", "BF16"),
    "RoiAlign": ("FP32", "FP16"),
    "Round": ("FP32", "FP16", "BF16"),
    "ScaledTanh": ("FP32", "FP16", "BF16"),
    "Scan": ("FP32", "FP16", "BF16"),
    "Scatter": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ScatterElements": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "ScatterND": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Selu": ("FP32", "FP16", "BF16"),
    "Shape": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Shrink": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Sigmoid": ("FP32", "FP16", "BF16"),
    "Sign": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Sin": ("FP32", "FP16", "BF16"),
    "Sinh": ("FP32", "FP16", "BF16"),
    "Size": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Slice": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Softmax": ("FP32", "FP16", "BF16"),
    "Softplus": ("FP32", "FP16", "BF16"),
    "Softsign": ("FP32", "FP16", "BF16"),
    "SpaceToDepth": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Split": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Sqrt": ("FP32", "FP16", "BF16"),
    "Squeeze": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Sub": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Sum": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Tan": ("FP32", "FP16", "BF16"),
    "Tanh": ("FP32", "FP16", "BF16"),
    "ThresholdedRelu": ("FP32", "FP16", "BF16"),
    "Tile": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "TopK": ("FP32", "FP16", "BF16", "INT32", "INT64"),
    "Transpose": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Trilu": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Unsqueeze": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Upsample": ("FP32", "FP16", "BF16"),
    "Where": ("FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"),
    "Xor": ("BOOL",),
}

# onnx-tensorrt 10.x: "supports operators in the inclusive range of opset 9 to opset 20".
TENSORRT_OPSETS = (9, 20)
TABLE_SOURCE = "onnx/onnx-tensorrt docs/operators.md @ 10.1-GA (96e7811)"

# "`axes` must be an initializer" (or "a constant tensor"): op -> index of that input.
CONSTANT_INPUTS: dict[str, int] = {
    "CumSum": 1,
    "Pad": 3,
    "ReduceL1": 1,
    "ReduceL2": 1,
    "ReduceLogSum": 1,
    "ReduceLogSumExp": 1,
    "ReduceMax": 1,
    "ReduceMean": 1,
    "ReduceMin": 1,
    "ReduceProd": 1,
    "ReduceSum": 1,
    "ReduceSumSquare": 1,
    "Slice": 3,
    "Squeeze": 1,
    "Unsqueeze": 1,
}

# ONNX TensorProto element types -> the table's type names.
ONNX_TYPE_NAMES = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FP16",
    11: "DOUBLE",
    16: "BF16",
}
_TYPE_FROM_OUTPUT = ("ConstantOfShape",)


def _value_types(model: Any) -> dict[str, int]:
    """Element type of every named tensor (after shape inference)."""
    graph = model.graph
    types: dict[str, int] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        elem = info.type.tensor_type.elem_type
        if elem:
            types[info.name] = elem
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def tensorrt_problems(model: Any) -> list[str]:
    """What in ``model`` (an ``onnx.ModelProto``) TensorRT's ONNX parser does not take.

    Returns one line per problem (empty: the graph only uses supported operators and
    types); checks the default-domain opset against :data:`TENSORRT_OPSETS` too.
    Nodes inside subgraphs (If/Loop bodies) are not visited: exported samplers have none.
    """
    import onnx

    problems: list[str] = []
    lo, hi = TENSORRT_OPSETS
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not lo <= opset.version <= hi:
            problems.append(f"opset {opset.version} is outside TensorRT 10's range {lo}..{hi}")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _value_types(inferred)
    constants = {init.name for init in inferred.graph.initializer}
    constants |= {n.output[0] for n in inferred.graph.node if n.op_type == "Constant"}
    for node in inferred.graph.node:
        label = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: custom domain {node.domain!r}")
            continue
        supported = TENSORRT_ONNX_OPS.get(node.op_type)
        if supported is None:
            problems.append(f"{label}: operator not supported by TensorRT's ONNX parser")
            continue
        use_output = node.op_type in _TYPE_FROM_OUTPUT or not any(node.input)
        tensor = node.output[0] if use_output else node.input[0]
        elem = types.get(tensor)
        if elem is None:
            problems.append(f"{label}: the type of {tensor!r} could not be inferred")
        elif ONNX_TYPE_NAMES.get(elem, str(elem)) not in supported:
            name = ONNX_TYPE_NAMES.get(elem, f"type {elem}")
            problems.append(f"{label}: {name} {tensor!r} is not among {supported}")
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            if node.input[index] not in constants:
                problems.append(f"{label}: input {index} must be a build-time constant")
    return problems
