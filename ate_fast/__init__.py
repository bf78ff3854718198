"""ate_fast: Align-Then-stEer for diffusion and flow VLA policies, fast.

Importing this package is cheap and never touches a native module: the C++/CUDA
modules and Triton load on first use (see :mod:`ate_fast.native`), and the names below
that live in subpackages are imported when first accessed.
"""

from __future__ import annotations

from ate_fast._version import __version__
from ate_fast.info import info
from ate_fast.lazy_exports import lazy_attributes
from ate_fast.ops import guided_step, mlp_guidance

# public name -> module that defines it (imported on first access)
_LAZY = {
    # sampling
    "NoiseSchedule": "ate_fast.sampling",
    "DiffusionSampler": "ate_fast.sampling",
    "FlowSampler": "ate_fast.sampling",
    "CapturedSampler": "ate_fast.sampling",
    "Guidance": "ate_fast.sampling",
    # steer
    "Steer": "ate_fast.steer",
    "SteerLoss": "ate_fast.steer",
    "LatentGuidance": "ate_fast.steer",
    # align
    "ActionVAE": "ate_fast.align",
    "LatentPrior": "ate_fast.align",
    "train_stage1": "ate_fast.align",
    "train_stage2": "ate_fast.align",
    # data
    "ActionChunkDataset": "ate_fast.data",
    # models
    "make_head": "ate_fast.models",
    # export
    "to_onnx": "ate_fast.export",
    "to_tensorrt": "ate_fast.export",
    "OnnxRuntimeSampler": "ate_fast.export",
    "TensorRTSampler": "ate_fast.export",
}
_SUBPACKAGES = ("align", "data", "export", "models", "ops", "sampling", "steer")

__all__ = ["__version__", "guided_step", "info", "mlp_guidance", *_LAZY, *_SUBPACKAGES]


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY, _SUBPACKAGES)
