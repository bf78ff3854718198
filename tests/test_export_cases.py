"""Shared export cases for tests/test_export_*.py (no tests in this file).

Each case is a sampler setup exported once per test session (:func:`exported` caches the
file): every sampler method, unguided and guided, on the MLP head's small config, and the
flow-transformer and U-Net heads' small configs, unguided and guided. Few steps keep the
unrolled graphs (and the export time) small; K does not change what is exported per step.

Diffusion cases give the MLP head ``time_scale=1e-3``: with π0's sinusoidal periods
(4e-3 … 4) and integer timesteps up to 999, the embedding's angles reach ~1e6 rad, where
float32's rounding of the angle alone moves sin/cos by up to 0.06. That head is then
ill-conditioned in float32 whatever runs it; the ``time_scale`` field exists for exactly
this. (The frequency table itself is the same in PyTorch and in the graph:
``test_time_embedding_table_is_torchs_in_the_graph``.)

Flow guidance at t = 1 (where every flow grid starts) multiplies g by c = −1e6 (the
floored −t/(1−t)): an element of g within κ/1e6 of zero leaves c·g unclamped, and its
float32 rounding is amplified a millionfold. Most inputs have no such element and every
implementation agrees to ~1e-7; when one does, PyTorch float32 itself lands 1e-5…2e-4
from a float64 run (its ``ref`` and ``cpu`` backends differ as much), and so does ONNX
Runtime. Guided flow cases are therefore held to DESIGN.md's low-precision rule instead:
ONNX Runtime's error against a float64 PyTorch run at most ``FLOW_GUIDED_FACTOR`` times
PyTorch float32's own (or 1e-4, whichever is larger); :func:`float64_twin` builds that run.

Likewise an ε-model's DPM-Solver++ step from the linear schedule's t = 999 (ᾱ = 4e-5;
diffusers' default "linspace" spacing starts there) with tweedie guidance scales g by
1/√ᾱ ≈ 156: in float32, PyTorch lands 3.6e-5 from a float64 run and ONNX Runtime 1.8e-4
(batch 8). The order-3 case starts at t = 830 ("leading" spacing) instead: 3e-6.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ate_fast.align import ActionVAE
from ate_fast.models import make_head
from ate_fast.sampling import DiffusionSampler, FlowSampler, NoiseSchedule
from ate_fast.steer import LatentGuidance

# a small paper-form encoder: 3 post-norm layers with the concatenation skip, GELU
TRANSFORMER_ENCODER = dict(d_model=32, num_heads=4, ff_dim=48, num_layers=3)
PARITY_TOLERANCE = 1e-4  # max |onnx − torch| / max |torch|, float32
FLOW_GUIDED_FACTOR = 4.0  # see the module docstring


@dataclass
class Case:
    """One exported sampler: ``build()`` -> (sampler, guidance or None)."""

    name: str
    head: str
    build: Callable[[], tuple[Any, Optional[LatentGuidance]]]
    cond_shape: tuple[int, ...] = ()
    target_input: bool = True
    extra: dict = field(default_factory=dict)


def _mlp(time_scale: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_head("mlp", "small", cond_dim=8, time_scale=time_scale).eval()


def _guidance(
    horizon: int, action_dim: int, mode: str, clamp: float = 0.5, seed: int = 1, arch="mlp"
):
    torch.manual_seed(seed)
    sizes = {"mlp": dict(hidden_dims=(64,)), "transformer": TRANSFORMER_ENCODER}[arch]
    vae = ActionVAE(action_dim, horizon, latent_dim=16, arch=arch, **sizes)
    mask = torch.ones(action_dim)
    mask[-1] = 0.0  # an absent action dim: masked in the encoder and its gradient
    target = torch.randn(16)
    return LatentGuidance(vae, target, scale=2.0, clamp=clamp, mode=mode, mask=mask)


def _flow(method: str, steps: int, **kw: Any) -> FlowSampler:
    return FlowSampler(_mlp(), steps, method, **kw)


def _diffusion(method: str, steps: int, schedule: NoiseSchedule, **kw: Any) -> DiffusionSampler:
    return DiffusionSampler(_mlp(1e-3), schedule, method, steps, **kw)


COSINE = NoiseSchedule("squaredcos_cap_v2", num_train_timesteps=100)
LINEAR = NoiseSchedule()

MLP_COND = (8,)
CASES = [
    # unguided: every method, with their options spread over the cases
    Case("euler", "mlp", lambda: (_flow("euler", 4), None), MLP_COND),
    Case(
        "heun-diffusers-grid",
        "mlp",
        lambda: (_flow("heun", 3, time_grid="diffusers", shift=3.0), None),
        MLP_COND,
    ),
    Case("ddpm", "mlp", lambda: (_diffusion("ddpm", 4, COSINE), None), MLP_COND),
    Case(
        "ddim-clip",
        "mlp",
        lambda: (_diffusion("ddim", 4, LINEAR, clip_sample=True), None),
        MLP_COND,
    ),
    Case(
        "ddim-eta-sample-trailing",
        "mlp",
        lambda: (
            _diffusion(
                "ddim", 3, COSINE, eta=0.5, prediction_type="sample", timestep_spacing="trailing"
            ),
            None,
        ),
        MLP_COND,
    ),
    Case(
        "dpmsolver2-v",
        "mlp",
        lambda: (_diffusion("dpmsolver++", 4, LINEAR, prediction_type="v_prediction"), None),
        MLP_COND,
    ),
    # guided (LatentGuidance over an MLP VAE encoder, masked action dim)
    Case("euler-guided", "mlp", lambda: (_flow("euler", 4), _guidance(50, 32, "direct")), MLP_COND),
    Case(
        "heun-guided-tweedie-baked",
        "mlp",
        lambda: (_flow("heun", 3), _guidance(50, 32, "tweedie", clamp=0.05)),
        MLP_COND,
        target_input=False,
    ),
    # guided through the paper's Transformer encoder (its hand-written VJP in the graph)
    Case(
        "euler-guided-transformer-encoder",
        "mlp",
        lambda: (_flow("euler", 3), _guidance(50, 32, "direct", arch="transformer")),
        MLP_COND,
    ),
    Case(
        "ddim-guided-tweedie-transformer-encoder",
        "mlp",
        lambda: (
            _diffusion("ddim", 3, LINEAR),
            _guidance(50, 32, "tweedie", arch="transformer"),
        ),
        MLP_COND,
    ),
    Case(
        "ddpm-guided-noclamp",
        "mlp",
        lambda: (_diffusion("ddpm", 4, COSINE), _guidance(50, 32, "direct", clamp=math.inf)),
        MLP_COND,
    ),
    Case(
        "ddim-guided-tweedie-v",
        "mlp",
        lambda: (
            _diffusion("ddim", 4, COSINE, prediction_type="v_prediction"),
            _guidance(50, 32, "tweedie"),
        ),
        MLP_COND,
    ),
    Case(
        "ddim-eta-clip-guided",
        "mlp",
        lambda: (
            _diffusion("ddim", 3, LINEAR, eta=1.0, clip_sample=True),
            _guidance(50, 32, "direct"),
        ),
        MLP_COND,
    ),
    Case(
        "dpmsolver3-guided-tweedie",
        "mlp",
        lambda: (
            _diffusion("dpmsolver++", 5, LINEAR, solver_order=3, timestep_spacing="leading"),
            _guidance(50, 32, "tweedie"),
        ),
        MLP_COND,
    ),
]


def _flow_transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_head("flow-transformer", "small").eval()


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_head("unet1d", "small").eval()


HEAD_CASES = [
    Case(
        "flow-transformer-euler",
        "flow-transformer",
        lambda: (FlowSampler(_flow_transformer(), 1), None),
        (4, 256),
    ),
    Case(
        "flow-transformer-euler-guided",
        "flow-transformer",
        lambda: (FlowSampler(_flow_transformer(), 1), _guidance(50, 32, "direct")),
        (4, 256),
    ),
    Case(
        "unet1d-ddim",
        "unet1d",
        lambda: (DiffusionSampler(_unet(), COSINE, "ddim", 1), None),
        (32,),
    ),
    Case(
        "unet1d-ddim-guided-tweedie",
        "unet1d",
        lambda: (DiffusionSampler(_unet(), COSINE, "ddim", 2), _guidance(16, 2, "tweedie")),
        (32,),
    ),
]
ALL_CASES = {case.name: case for case in CASES + HEAD_CASES}

_EXPORTED: dict[str, tuple[Path, Any, Any]] = {}


def float64_twin(sampler: Any, guidance: Optional[LatentGuidance]) -> tuple[Any, Any]:
    """Copies of ``sampler`` and ``guidance`` computing in float64 (same weights)."""
    twin = copy.deepcopy(sampler)
    twin.model_fn.double()
    twin._tables.clear()
    if guidance is None:
        return twin, None
    guided = copy.deepcopy(guidance)
    guided.encoder.source.double()
    guided.set_target(guided.target.double())
    guided.encoder.mask = guided.encoder.mask.double()
    return twin, guided


def example_inputs(case: Case, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise [B, H, D], cond [B, ...]) for ``case``'s head."""
    horizon, action_dim = {"mlp": (50, 32), "flow-transformer": (50, 32), "unet1d": (16, 2)}[
        case.head
    ]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, horizon, action_dim, generator=gen)
    cond = torch.randn(batch, *case.cond_shape, generator=gen)
    return noise, cond


def exported(name: str, directory: Path) -> tuple[Path, Any, Any]:
    """(onnx path, sampler, guidance) for case ``name``, exported once per session."""
    from ate_fast.export import to_onnx

    if name not in _EXPORTED:
        case = ALL_CASES[name]
        sampler, guidance = case.build()
        noise, cond = example_inputs(case, batch=1)
        path = to_onnx(
            sampler, directory / f"{name}.onnx", noise, cond, guidance=guidance,
            target_input=case.target_input,
        )  # fmt: skip
        _EXPORTED[name] = (path, sampler, guidance)
    return _EXPORTED[name]
