"""Reference policy heads for benchmarks, tests and the demo (users bring their own).

All share the sampler's model-function signature ``forward(x [B, H, D], t [B], cond) ->
[B, H, D]`` (diffusion: integer timesteps; flow: t in [0, 1], t = 1 noise), are free of host
syncs and data-dependent control flow (CUDA-graph capturable, ``torch.compile(fullgraph=True)``).
Each also splits its forward into ``step_features(x, t [N, B], cond)`` (what depends on
time and conditioning only, for N steps at once) and ``forward_features(x, features)``,
which the samplers use to compute the former once per call
(:mod:`ate_fast.sampling.step_features`).
"""

from ate_fast.models.chunk_conv import ChunkConv1d, ChunkConvTranspose1d, use_chunk_convs
from ate_fast.models.flow_transformer import (
    FLOW_TRANSFORMER_CONFIGS,
    FlowStepFeatures,
    FlowTransformerConfig,
    FlowTransformerHead,
    PrefixCache,
)
from ate_fast.models.mlp_head import MLP_HEAD_CONFIGS, MLPHead, MLPHeadConfig
from ate_fast.models.registry import HEADS, count_parameters, make_head
from ate_fast.models.unet1d import UNET_CONFIGS, ConditionalUnet1D, UnetConfig

__all__ = [
    "FLOW_TRANSFORMER_CONFIGS",
    "HEADS",
    "MLP_HEAD_CONFIGS",
    "UNET_CONFIGS",
    "ChunkConv1d",
    "ChunkConvTranspose1d",
    "ConditionalUnet1D",
    "FlowStepFeatures",
    "FlowTransformerConfig",
    "FlowTransformerHead",
    "MLPHead",
    "MLPHeadConfig",
    "PrefixCache",
    "UnetConfig",
    "count_parameters",
    "make_head",
    "use_chunk_convs",
]
