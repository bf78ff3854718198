"""ate_fast: Align-Then-stEer for diffusion and flow VLA policies, fast.

Importing this package is cheap and never touches a native module: the C++/CUDA
modules and Triton load on first use (see :mod:`ate_fast.native`), and the names below
that live in subpackages are imported when first accessed.

Layers (arrows point down; ``tests/test_architecture.py`` checks them): ``ops`` (fused
kernels) → ``guidance`` (the contract) → ``sampling``, ``steer`` and ``realtime`` → ``export``,
``eval``, ``demo``, ``tuning``; ``align``, ``data`` and ``models`` stand beside them.
"""

from __future__ import annotations

from ate_fast._version import __version__
from ate_fast.lazy_exports import lazy_attributes

# public name -> module that defines it (imported on first access)
_LAZY = {
    "guided_step": "ate_fast.ops.guided_step",
    "mlp_guidance": "ate_fast.ops.mlp_guidance",
    "info": "ate_fast.system_info",
    "Guidance": "ate_fast.guidance",
    "NoiseSchedule": "ate_fast.sampling",
    "DiffusionSampler": "ate_fast.sampling",
    "FlowSampler": "ate_fast.sampling",
    "CapturedSampler": "ate_fast.sampling",
    "Steer": "ate_fast.steer",
    "SteerLoss": "ate_fast.steer",
    "LatentGuidance": "ate_fast.steer",
    "RTCGuidance": "ate_fast.realtime",
    "TrainingTimeRTC": "ate_fast.realtime",
    "PrefixInpainting": "ate_fast.realtime",
    "ActionVAE": "ate_fast.align",
    "LatentPrior": "ate_fast.align",
    "train_stage1": "ate_fast.align",
    "train_stage2": "ate_fast.align",
    "ActionChunkDataset": "ate_fast.data",
    "make_head": "ate_fast.models",
    "to_onnx": "ate_fast.export",
    "to_tensorrt": "ate_fast.export",
    "OnnxRuntimeSampler": "ate_fast.export",
    "TensorRTSampler": "ate_fast.export",
    "autotune": "ate_fast.tuning",
    "apply_settings": "ate_fast.tuning",
    "load_settings": "ate_fast.tuning",
}
_SUBPACKAGES = (
    "align",
    "data",
    "errors",
    "export",
    "guidance",
    "models",
    "ops",
    "realtime",
    "sampling",
    "steer",
    "tuning",
)

__all__ = ["__version__", *_LAZY, *_SUBPACKAGES]

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY, _SUBPACKAGES)
