"""Deployment: a whole sampler as one ONNX graph, ONNX Runtime and TensorRT runners.

- :func:`to_onnx`: the K-step loop — policy head, schedule coefficients as constants,
  guided steps and (optionally) the latent guidance's encoder VJP as forward ops — as one
  graph; checked with ``onnx.checker`` and against TensorRT's ONNX operator table.
- :class:`OnnxRuntimeSampler`: runs such a graph with the samplers' ``sample`` signature.
- :func:`to_tensorrt`: builds a TensorRT engine (TensorRT 10: builder precision flags;
  TensorRT 11: strongly typed, precision by casting the ONNX graph).
- :class:`TensorRTSampler`: runs an engine on torch CUDA tensors (optionally as a CUDA
  graph).

Names load on first use, so ``import ate_fast.export.cli`` (``ate-fast --help``) imports
neither onnx nor tensorrt.
"""

from __future__ import annotations

from ate_fast.lazy_exports import lazy_attributes

_EXPORTS = {
    "to_onnx": "onnx_export",
    "read_signature": "onnx_export",
    "relative_error": "onnx_export",
    "ExportError": "onnx_export",
    "SUPPORTED_OPSETS": "onnx_export",
    "ModelTraceError": "sampler_graph",
    "GuidanceExportError": "guidance_graph",
    "GraphSignature": "signature",
    "OnnxRuntimeSampler": "onnxruntime_runner",
    "TENSORRT_ONNX_OPS": "tensorrt_ops",
    "tensorrt_problems": "tensorrt_ops",
    "cast_for_precision": "precision",
    "to_tensorrt": "tensorrt_build",
    "tensorrt_version": "tensorrt_build",
    "TensorRTUnavailableError": "tensorrt_build",
    "TensorRTBuildError": "tensorrt_build",
    "TensorRTSampler": "tensorrt_runner",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_attributes(
    globals(), {name: f"ate_fast.export.{module}" for name, module in _EXPORTS.items()}
)
